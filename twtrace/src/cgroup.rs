//! What a cgroup id says about a socket's owner: the cgroup's path in the
//! v2 hierarchy (the kernel's id is its directory's inode), and from the
//! path the systemd unit, the container and the Kubernetes pod, by the
//! path conventions of systemd, docker, containerd, CRI-O, podman and the
//! kubelet's two cgroup drivers. Looked up once per cgroup, never per event.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

/// What a cgroup path names. Each part only where the path says it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The path under the v2 hierarchy's root, from `/`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cgroup: String,
    /// The systemd unit (`nginx.service`), not a container's scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The container id (64 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The Kubernetes pod's UID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`, with `pod_uid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// The pod's name and Kubernetes namespace, and the container's name,
    /// where the node's kubelet log directories say (`kubelet_logs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
}

impl Workload {
    /// The pod as people name it — `namespace/name` — else its UID.
    #[must_use]
    pub fn pod_name(&self) -> Option<String> {
        match (&self.k8s_namespace, &self.pod) {
            (Some(ns), Some(pod)) => Some(format!("{ns}/{pod}")),
            _ => self.pod_uid.clone(),
        }
    }
}

/// Names a cgroup from its path.
#[must_use]
pub fn parse(path: &str) -> Workload {
    let mut out = Workload {
        cgroup: path.to_owned(),
        ..Workload::default()
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if let Some((qos, uid)) = pod_of(part, parts.get(i.wrapping_sub(1)).copied()) {
            out.qos = Some(qos.to_owned());
            out.pod_uid = Some(uid);
        }
        if let Some(id) = container_of(part) {
            out.container = Some(id.to_owned());
        } else if matches!(part.rsplit_once('.'), Some((_, "service" | "scope"))) {
            out.unit = Some((*part).to_owned());
        }
    }
    if out.container.is_some() {
        // A container's own scope is no unit of the host's.
        out.unit = out
            .unit
            .filter(|u| matches!(u.rsplit_once('.'), Some((_, "service"))));
    }
    out
}

/// A pod's `QoS` class and UID: the systemd driver's
/// `kubepods-<qos>-pod<uid with _>.slice` (no qos: guaranteed), or the
/// cgroupfs driver's `pod<uid>` under `kubepods[/<qos>]`.
fn pod_of(part: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    if let Some(rest) = part.strip_prefix("kubepods-")
        && let Some(rest) = rest.strip_suffix(".slice")
    {
        let (qos, pod) = match rest.split_once("-pod") {
            Some((q, p)) => (q, p),
            None => ("", rest.strip_prefix("pod")?),
        };
        return Some((qos_name(qos)?, pod.replace('_', "-")));
    }
    let uid = part.strip_prefix("pod")?;
    let qos = match parent? {
        "kubepods" => "",
        q => q,
    };
    if uid.len() != 36 {
        return None;
    }
    Some((qos_name(qos)?, uid.to_owned()))
}

fn qos_name(qos: &str) -> Option<&'static str> {
    match qos {
        "" => Some("guaranteed"),
        "burstable" => Some("burstable"),
        "besteffort" => Some("besteffort"),
        _ => None,
    }
}

/// A container id: 64 hex digits, bare (cgroupfs drivers) or in the
/// runtime's scope (`docker-`, `cri-containerd-`, `crio-`, `libpod-`,
/// `containerd-` … `.scope`).
fn container_of(part: &str) -> Option<&str> {
    let id = part.strip_suffix(".scope").unwrap_or(part);
    let id = id.rsplit_once('-').map_or(id, |(_, id)| id);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// How often the hierarchy is walked again for ids not found.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// Where the kubelet keeps container logs: its directory and file names
/// are the only place on a node that names pods and containers without
/// credentials (log shippers read them the same way). `TWTRACE_KUBELET_LOGS`
/// names another directory holding `pods/` and `containers/`.
pub const KUBELET_LOGS: &str = "/var/log";

fn kubelet_logs() -> PathBuf {
    std::env::var_os("TWTRACE_KUBELET_LOGS")
        .map_or_else(|| PathBuf::from(KUBELET_LOGS), PathBuf::from)
}

/// Pod and container names from the kubelet's log directories:
/// `pods/<namespace>_<pod>_<uid>/` and
/// `containers/<pod>_<namespace>_<container>-<id>.log`. Names and
/// namespaces are DNS labels, so `_` never occurs inside one.
#[derive(Debug, Default)]
struct KubeletNames {
    /// Pod UID to (namespace, pod).
    pods: HashMap<String, (String, String)>,
    /// Container id to (namespace, pod, container).
    containers: HashMap<String, (String, String, String)>,
}

impl KubeletNames {
    fn read(logs: &Path) -> Self {
        let names = |dir: &str| -> Vec<String> {
            std::fs::read_dir(logs.join(dir))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        };
        let mut out = Self::default();
        for name in names("pods") {
            if let [ns, pod, uid] = name.split('_').collect::<Vec<_>>()[..] {
                out.pods
                    .insert(uid.to_owned(), (ns.to_owned(), pod.to_owned()));
            }
        }
        for name in names("containers") {
            let Some(stem) = name.strip_suffix(".log") else {
                continue;
            };
            if let [pod, ns, rest] = stem.split('_').collect::<Vec<_>>()[..]
                && let Some((container, id)) = rest.rsplit_once('-')
                && container_of(id).is_some()
            {
                out.containers.insert(
                    id.to_owned(),
                    (ns.to_owned(), pod.to_owned(), container.to_owned()),
                );
            }
        }
        out
    }

    /// Names what the cgroup path left unnamed.
    fn name(&self, w: &mut Workload) {
        if let Some((ns, pod, container)) =
            w.container.as_ref().and_then(|id| self.containers.get(id))
        {
            w.k8s_namespace = Some(ns.clone());
            w.pod = Some(pod.clone());
            w.container_name = Some(container.clone());
        }
        if let Some((ns, pod)) = w.pod_uid.as_ref().and_then(|uid| self.pods.get(uid)) {
            w.k8s_namespace = Some(ns.clone());
            w.pod = Some(pod.clone());
        }
    }
}

/// Cgroup ids to workloads, learnt by walking the v2 hierarchy.
pub struct Workloads {
    root: Option<PathBuf>,
    kubelet_logs: PathBuf,
    by_id: HashMap<u64, Workload>,
    scanned: Option<Instant>,
}

impl Workloads {
    /// On the host's v2 hierarchy (`/sys/fs/cgroup`, or
    /// `/sys/fs/cgroup/unified` on hybrid hosts).
    #[must_use]
    pub fn new() -> Self {
        Self::at(v2_root())
    }

    #[must_use]
    pub fn at(root: Option<PathBuf>) -> Self {
        Self {
            root,
            kubelet_logs: kubelet_logs(),
            by_id: HashMap::new(),
            scanned: None,
        }
    }

    /// Pod and container names from kubelet logs under `dir`.
    #[must_use]
    pub fn with_kubelet_logs(mut self, dir: PathBuf) -> Self {
        self.kubelet_logs = dir;
        self
    }

    /// What cgroup `id` is; `None` for 0, a cgroup gone before it was
    /// seen, or a host without a v2 hierarchy.
    pub fn get(&mut self, id: u64) -> Option<&Workload> {
        if id == 0 {
            return None;
        }
        if !self.by_id.contains_key(&id) && self.scanned.is_none_or(|t| t.elapsed() >= RESCAN_EVERY)
        {
            self.scan();
        }
        self.by_id.get(&id)
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        let kubelet = KubeletNames::read(&self.kubelet_logs);
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let path = Path::new("/").join(dir.strip_prefix(&root).unwrap_or(&dir));
            self.by_id.entry(meta.ino()).or_insert_with(|| {
                let mut w = parse(&path.to_string_lossy());
                kubelet.name(&mut w);
                w
            });
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

impl Default for Workloads {
    fn default() -> Self {
        Self::new()
    }
}

/// The v2 cgroup id of process `pid` — its cgroup directory's inode, as
/// `bpf_get_current_cgroup_id()` gives it — under the hierarchy at `root`.
#[must_use]
pub fn id_of_process(root: &Path, pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    let dir = root.join(path.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// Where the v2 hierarchy is mounted, from `/proc/self/mountinfo`.
#[must_use]
pub fn v2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        fields.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

    #[test]
    fn a_systemd_service() {
        let w = parse("/system.slice/nginx.service");
        assert_eq!(w.unit.as_deref(), Some("nginx.service"));
        assert_eq!((w.container, w.pod_uid), (None, None));
    }

    #[test]
    fn containers_of_each_runtime() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/system.slice/crio-{ID}.scope"),
        ] {
            let w = parse(&path);
            assert_eq!(w.container.as_deref(), Some(ID), "{path}");
            assert_eq!(w.unit, None, "{path}: a container's scope is no unit");
        }
    }

    #[test]
    fn pods_under_the_systemd_driver() {
        let w = parse(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b3c4d_0000_1111_2222_333344445555.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(
            w.pod_uid.as_deref(),
            Some("1a2b3c4d-0000-1111-2222-333344445555")
        );
        assert_eq!(w.qos.as_deref(), Some("burstable"));
        assert_eq!(w.container.as_deref(), Some(ID));
        let w =
            parse("/kubepods.slice/kubepods-pod1a2b3c4d_0000_1111_2222_333344445555.slice/x.scope");
        assert_eq!(w.qos.as_deref(), Some("guaranteed"));
    }

    #[test]
    fn pods_under_the_cgroupfs_driver() {
        let w = parse(&format!(
            "/kubepods/besteffort/pod1a2b3c4d-0000-1111-2222-333344445555/{ID}"
        ));
        assert_eq!(
            w.pod_uid.as_deref(),
            Some("1a2b3c4d-0000-1111-2222-333344445555")
        );
        assert_eq!(w.qos.as_deref(), Some("besteffort"));
        assert_eq!(w.container.as_deref(), Some(ID));
        let w = parse(&format!(
            "/kubepods/pod1a2b3c4d-0000-1111-2222-333344445555/{ID}"
        ));
        assert_eq!(w.qos.as_deref(), Some("guaranteed"));
    }

    #[test]
    fn nothing_where_the_path_says_nothing() {
        let w = parse("/user.slice/user-1000.slice/session-2.scope");
        assert_eq!(w.unit.as_deref(), Some("session-2.scope"));
        assert_eq!((w.container, w.pod_uid, w.qos), (None, None, None));
        assert_eq!(parse("/").unit, None);
    }

    #[test]
    fn pods_and_containers_are_named_from_the_kubelets_logs() {
        let dir = std::env::temp_dir().join(format!("twtrace-kl-{}", std::process::id()));
        let uid = "1a2b3c4d-0000-1111-2222-333344445555";
        std::fs::create_dir_all(dir.join(format!("pods/shop_web-7d9f_{uid}/app"))).unwrap();
        std::fs::create_dir_all(dir.join("containers")).unwrap();
        std::fs::write(
            dir.join(format!("containers/web-7d9f_shop_app-server-{ID}.log")),
            "",
        )
        .unwrap();
        // Not the kubelet's: ignored.
        std::fs::write(dir.join("containers/notes.txt"), "").unwrap();
        let names = KubeletNames::read(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let mut pod = parse(&format!(
            "/kubepods/pod{uid}/0000000000000000000000000000000000000000000000000000000000000000"
        ));
        names.name(&mut pod);
        assert_eq!(pod.pod_name().as_deref(), Some("shop/web-7d9f"));
        assert_eq!(pod.container_name, None);
        let mut container = parse(&format!("/system.slice/docker-{ID}.scope"));
        names.name(&mut container);
        assert_eq!(
            (
                container.k8s_namespace.as_deref(),
                container.pod.as_deref(),
                container.container_name.as_deref()
            ),
            (Some("shop"), Some("web-7d9f"), Some("app-server"))
        );
        let mut alone = parse("/kubepods/pod0f0e0d0c-0000-1111-2222-333344445555/x");
        names.name(&mut alone);
        assert_eq!(
            alone.pod_name().as_deref(),
            Some("0f0e0d0c-0000-1111-2222-333344445555")
        );
    }

    #[test]
    fn ids_are_the_directories_inodes() {
        let dir = std::env::temp_dir().join(format!("twtrace-cg-{}", std::process::id()));
        let unit = dir.join("test.slice/web.service");
        std::fs::create_dir_all(&unit).unwrap();
        let ino = std::fs::metadata(&unit).unwrap().ino();
        let mut workloads = Workloads::at(Some(dir.clone()));
        let w = workloads.get(ino).cloned();
        std::fs::remove_dir_all(&dir).unwrap();
        let w = w.expect("found by inode");
        assert_eq!(w.cgroup, "/test.slice/web.service");
        assert_eq!(w.unit.as_deref(), Some("web.service"));
        assert_eq!(workloads.get(0), None);
    }
}
