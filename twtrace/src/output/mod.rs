//! Everything twtrace prints.

pub mod metrics;
pub mod record;
pub mod sockets;
pub mod stream;
pub mod summary;

/// How a command prints: for people, or for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// The groups `by` makes of a run's counts, named from this host's cgroup
/// hierarchy (and kubelet logs) and network namespaces.
#[must_use]
pub fn groups_here(
    stats: &crate::histogram::TeardownStats,
    now: &crate::census::CensusNow,
    by: crate::grouping::GroupBy,
    workloads: &mut crate::cgroup::Workloads,
) -> Vec<crate::grouping::Group> {
    let namespaces = if by == crate::grouping::GroupBy::Netns {
        crate::netns::all()
    } else {
        Vec::new()
    };
    crate::grouping::groups(
        stats,
        now,
        by,
        |id| workloads.get(id).cloned(),
        |inode| crate::netns::name_of(inode, &namespaces),
    )
}
