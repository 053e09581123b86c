//! Every hook twtrace attaches, in one table: the program, where it
//! attaches, and the feature it serves. Which hooks a run needs follows
//! from the kernel's facts and the options; a hook that fails to attach
//! costs its feature, with one warning naming what is lost — except the
//! state-change hook, without which there is nothing to trace.

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, RawTracePoint, TracePoint},
};
use twtrace_common::names;

use super::{TracerOptions, probe::KernelFacts};

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub enum Point {
    /// A raw tracepoint (`category` for messages, `event`): per-program
    /// recursion guard, the arguments as the kernel passes them.
    Raw(&'static str, &'static str),
    /// A classic tracepoint (`category`, `event`): its record as tracefs
    /// describes it.
    Classic(&'static str, &'static str),
    /// A BTF-typed raw tracepoint (`tp_btf`; `category`, `event`): the
    /// raw one's arguments, typed, so the program reads their fields with
    /// plain loads instead of a helper call each.
    Btf(&'static str, &'static str),
}

/// What a group of hooks gives the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// Every state change of a full socket: without it, nothing.
    Transitions,
    /// Owners of accepted sockets learnt at their first send.
    OwnerAtSend,
    /// The same, at their first receive.
    OwnerAtReceive,
    /// TIME_WAIT mini-sockets' birth, substate and end.
    TimeWait,
    /// `record`'s command and the children it forks.
    FollowForks,
    /// Resets received: without it, told from the socket's error.
    ResetsReceived,
    /// Resets sent before a close, and those that end no connection.
    ResetsSent,
}

pub struct Hook {
    pub program: &'static str,
    pub point: Point,
    pub feature: Feature,
}

pub const HOOKS: &[Hook] = &[
    // The mini-socket hooks go in before the state changes: a hand-over
    // (FIN_WAIT2 -> CLOSE) seen while timer_start was not yet attached
    // read as a close that skipped TIME_WAIT (tcp_max_tw_buckets full),
    // two in the first second of a run where the kernel counted none.
    // On each hot tracepoint the typed pair where the kernel loads it,
    // else the raw pair.
    Hook {
        program: names::PROG_TIMER_START_BTF,
        point: Point::Btf("timer", "timer_start"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_START_BTF_TWIN,
        point: Point::Btf("timer", "timer_start"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_START_RAW,
        point: Point::Raw("timer", "timer_start"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_START_TWIN,
        point: Point::Raw("timer", "timer_start"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_START,
        point: Point::Classic("timer", "timer_start"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_EXPIRE,
        point: Point::Raw("timer", "timer_expire_entry"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_EXPIRE_TWIN,
        point: Point::Raw("timer", "timer_expire_entry"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_CANCEL_BTF,
        point: Point::Btf("timer", "timer_cancel"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_CANCEL_BTF_TWIN,
        point: Point::Btf("timer", "timer_cancel"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_CANCEL,
        point: Point::Raw("timer", "timer_cancel"),
        feature: Feature::TimeWait,
    },
    Hook {
        program: names::PROG_TIMER_CANCEL_TWIN,
        point: Point::Raw("timer", "timer_cancel"),
        feature: Feature::TimeWait,
    },
    // Before the state changes: a reset received marks the record
    // its close then reads.
    Hook {
        program: names::PROG_RECEIVE_RESET,
        point: Point::Raw("tcp", "tcp_receive_reset"),
        feature: Feature::ResetsReceived,
    },
    Hook {
        program: names::PROG_SEND_RESET,
        point: Point::Raw("tcp", "tcp_send_reset"),
        feature: Feature::ResetsSent,
    },
    Hook {
        program: names::PROG_SET_STATE_BTF,
        point: Point::Btf("sock", "inet_sock_set_state"),
        feature: Feature::Transitions,
    },
    Hook {
        program: names::PROG_SET_STATE_BTF_TWIN,
        point: Point::Btf("sock", "inet_sock_set_state"),
        feature: Feature::Transitions,
    },
    Hook {
        program: names::PROG_SET_STATE_RAW,
        point: Point::Raw("sock", "inet_sock_set_state"),
        feature: Feature::Transitions,
    },
    // Each hot raw hook has a twin, attached after it, for the hits the
    // kernel's recursion guard skips it for (the kernel side's `twin`).
    Hook {
        program: names::PROG_SET_STATE_TWIN,
        point: Point::Raw("sock", "inet_sock_set_state"),
        feature: Feature::Transitions,
    },
    Hook {
        program: names::PROG_SET_STATE,
        point: Point::Classic("sock", "inet_sock_set_state"),
        feature: Feature::Transitions,
    },
    // Debian 12's 6.1 has no tcp_sendmsg_locked.
    Hook {
        program: names::PROG_SENDMSG,
        point: Point::Raw("tcp", "tcp_sendmsg_locked"),
        feature: Feature::OwnerAtSend,
    },
    Hook {
        program: names::PROG_RCV_SPACE,
        point: Point::Raw("tcp", "tcp_rcv_space_adjust"),
        feature: Feature::OwnerAtReceive,
    },
    Hook {
        program: names::PROG_FORK,
        point: Point::Classic("sched", "sched_process_fork"),
        feature: Feature::FollowForks,
    },
];

impl Hook {
    /// Whether this run uses the hook; `typed_failed`: the tracepoints
    /// whose typed pair the kernel refused.
    fn wanted(&self, facts: &KernelFacts, options: &TracerOptions, typed_failed: &[&str]) -> bool {
        let event = self.event();
        let typed = !options.raw_tracepoints
            && !typed_failed.contains(&event)
            && typed_possible(self.feature, facts)
            && HOOKS
                .iter()
                .any(|h| matches!(h.point, Point::Btf(..)) && h.event() == event);
        match self.point {
            Point::Btf(..) if !typed => return false,
            Point::Raw(..) if typed => return false,
            _ => {}
        }
        match self.feature {
            // With BTF's struct sock layout the typed or the raw pair,
            // without it the classic program.
            Feature::Transitions => (self.program == names::PROG_SET_STATE) == facts.sock.is_none(),
            Feature::OwnerAtSend | Feature::OwnerAtReceive => true,
            // timer_start typed or raw where BTF gives struct timer_list's
            // layout, else the classic tracepoint's record.
            Feature::TimeWait => {
                facts.time_wait_possible()
                    && match self.program {
                        names::PROG_TIMER_START_RAW | names::PROG_TIMER_START_TWIN => {
                            facts.time_wait.has_btf == 1
                        }
                        names::PROG_TIMER_START => facts.time_wait.has_btf == 0,
                        _ => true,
                    }
            }
            Feature::FollowForks => options.follow_forks,
            // They read the socket's state through BTF's layout.
            Feature::ResetsReceived | Feature::ResetsSent => facts.sock.is_some(),
        }
    }

    /// The tracepoint's name.
    fn event(&self) -> &'static str {
        let (Point::Raw(_, event) | Point::Classic(_, event) | Point::Btf(_, event)) = self.point;
        event
    }

    fn point_name(&self) -> String {
        let (Point::Raw(category, _) | Point::Classic(category, _) | Point::Btf(category, _)) =
            self.point;
        format!("{category}:{}", self.event())
    }

    /// The warning when this hook could not be attached.
    fn lost(&self, facts: &KernelFacts, error: &anyhow::Error) -> String {
        let what = if is_not_found(error) {
            format!("this kernel has no tracepoint {}", self.point_name())
        } else {
            format!(
                "tracepoint {} could not be attached ({error:#})",
                self.point_name()
            )
        };
        match self.feature {
            Feature::OwnerAtSend => format!(
                "{what}: accepted sockets count as their listener's owner's until their first receive or close()"
            ),
            Feature::OwnerAtReceive => format!(
                "{what}: accepted sockets count as their listener's owner's until their first send or close()"
            ),
            Feature::ResetsReceived => {
                format!("{what}: a reset received is told from the error it left on the socket")
            }
            Feature::ResetsSent => format!(
                "{what}: resets sent before a close (keepalive, memory) end as `unknown`, and resets that end no connection are not counted"
            ),
            _ => {
                // Debian's kernels make perf_event_paranoid=3 (their
                // default) refuse perf_event_open without CAP_SYS_ADMIN.
                let hint = if matches!(self.point, Point::Classic(..))
                    && facts.perf_event_paranoid.is_some_and(|p| p > 2)
                {
                    "; with kernel.perf_event_paranoid=3 this kernel may need CAP_SYS_ADMIN, or `sysctl kernel.perf_event_paranoid=2`"
                } else {
                    ""
                };
                format!(
                    "tracepoint {} unavailable ({error:#}{hint}): TIME_WAIT lifetimes are incomplete",
                    self.point_name()
                )
            }
        }
    }
}

/// Whether typed programs can serve `feature`: they read through the
/// layouts BTF gives.
fn typed_possible(feature: Feature, facts: &KernelFacts) -> bool {
    match feature {
        Feature::Transitions => facts.sock.is_some(),
        Feature::TimeWait => facts.time_wait.has_btf == 1,
        _ => false,
    }
}

/// Whether `program` is a twin: its own recursion misses lose nothing
/// (its primary ran for those hits).
#[must_use]
pub fn is_twin(program: &str) -> bool {
    program.ends_with("_twin")
}

/// What attaching gave.
pub struct Attached {
    pub programs: Vec<&'static str>,
    pub time_wait: bool,
    pub warnings: Vec<String>,
}

/// Attaches every hook this run wants, from the table.
pub fn attach_all(
    ebpf: &mut Ebpf,
    facts: &KernelFacts,
    options: &TracerOptions,
) -> anyhow::Result<Attached> {
    let mut attached = Attached {
        programs: Vec::new(),
        time_wait: facts.time_wait_possible(),
        warnings: Vec::new(),
    };
    let mut typed_failed = Vec::new();
    let mut btf = None;
    for hook in HOOKS {
        if !hook.wanted(facts, options, &typed_failed) {
            continue;
        }
        match attach(ebpf, hook, &mut btf) {
            Ok(()) => attached.programs.push(hook.program),
            Err(error) if matches!(hook.point, Point::Btf(..)) => {
                // Older kernels may refuse a typed program: the raw pair
                // does the same work, a few helper calls dearer.
                log::info!(
                    "{} not loaded ({error:#}): the raw tracepoint instead",
                    hook.program
                );
                typed_failed.push(hook.event());
                unload_typed(ebpf, hook.event(), &mut attached.programs)?;
            }
            Err(error) => match hook.feature {
                Feature::Transitions => {
                    return Err(
                        error.context(format!("attaching to the {} tracepoint", hook.point_name()))
                    );
                }
                Feature::FollowForks => {
                    return Err(error.context(
                        "attaching to sched:sched_process_fork (needed to follow the command's children)",
                    ));
                }
                Feature::TimeWait => {
                    attached.time_wait = false;
                    attached.warnings.push(hook.lost(facts, &error));
                }
                Feature::OwnerAtSend
                | Feature::OwnerAtReceive
                | Feature::ResetsReceived
                | Feature::ResetsSent => {
                    attached.warnings.push(hook.lost(facts, &error));
                }
            },
        }
    }
    Ok(attached)
}

/// Detaches and unloads the typed programs on `event` attached so far
/// (the first of the pair, when the second failed).
fn unload_typed(
    ebpf: &mut Ebpf,
    event: &str,
    attached: &mut Vec<&'static str>,
) -> anyhow::Result<()> {
    for hook in HOOKS
        .iter()
        .filter(|h| matches!(h.point, Point::Btf(..)) && h.event() == event)
    {
        if attached.contains(&hook.program)
            && let Some(program) = ebpf.program_mut(hook.program)
        {
            <&mut BtfTracePoint>::try_from(program)?.unload()?;
            attached.retain(|p| *p != hook.program);
        }
    }
    Ok(())
}

/// Loads and attaches `hook`'s program; the kernel's BTF (`btf`, read on
/// first need) for typed ones.
fn attach(ebpf: &mut Ebpf, hook: &Hook, btf: &mut Option<Btf>) -> anyhow::Result<()> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| anyhow::anyhow!("the eBPF object lacks {}", hook.program))?;
    match hook.point {
        Point::Btf(_, event) => {
            let program: &mut BtfTracePoint = program.try_into()?;
            if btf.is_none() {
                *btf = Some(Btf::from_sys_fs()?);
            }
            let btf = btf.as_ref().expect("just read");
            program.load(event, btf)?;
            program.attach()?;
        }
        Point::Raw(_, tracepoint) => {
            let program: &mut RawTracePoint = program.try_into()?;
            program.load()?;
            program.attach(tracepoint)?;
        }
        Point::Classic(category, event) => {
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            program.attach(category, event)?;
        }
    }
    Ok(())
}

/// Detaches and unloads the state-change hooks (fault injection for the
/// tests: every hand-over to a mini-socket then goes unseen, as when the
/// kernel skips both programs of the pair).
/// Keeps the others in `attached`.
#[cfg(feature = "fault-injection")]
pub fn unload_state_changes(
    ebpf: &mut Ebpf,
    attached: &mut Vec<&'static str>,
) -> anyhow::Result<()> {
    for hook in HOOKS.iter().filter(|h| h.feature == Feature::Transitions) {
        if !attached.contains(&hook.program) {
            continue;
        }
        let program = ebpf
            .program_mut(hook.program)
            .ok_or_else(|| anyhow::anyhow!("the eBPF object lacks {}", hook.program))?;
        match hook.point {
            Point::Raw(..) => <&mut RawTracePoint>::try_from(program)?.unload()?,
            Point::Classic(..) => <&mut TracePoint>::try_from(program)?.unload()?,
            Point::Btf(..) => <&mut BtfTracePoint>::try_from(program)?.unload()?,
        }
        attached.retain(|p| *p != hook.program);
    }
    Ok(())
}

/// Whether attaching failed because the kernel has no such tracepoint.
fn is_not_found(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_names_a_program_of_the_embedded_object_once() {
        let object = super::super::EBPF_OBJECT;
        let mut seen: Vec<&str> = Vec::new();
        for hook in HOOKS {
            assert!(!seen.contains(&hook.program), "{} twice", hook.program);
            seen.push(hook.program);
            let name = hook.program.as_bytes();
            assert!(
                object
                    .windows(name.len() + 1)
                    .any(|w| w[..name.len()] == *name && w[name.len()] == 0),
                "the eBPF object has no symbol {}",
                hook.program
            );
        }
    }

    #[test]
    fn warnings_name_the_tracepoint_and_the_feature_lost() {
        let facts = KernelFacts {
            set_state: twtrace_common::SetStateLayout::DEFAULT,
            sock: None,
            time_wait: twtrace_common::TwConfig::DISABLED,
            fork_child_pid: None,
            reset_reasons: super::super::probe::ResetReasons::default(),
            tw_capacity: 1024,
            tw_alive_at_start: 0,
            perf_event_paranoid: Some(3),
            warnings: Vec::new(),
        };
        let missing = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        let send = HOOKS
            .iter()
            .find(|h| h.feature == Feature::OwnerAtSend)
            .unwrap();
        assert_eq!(
            send.lost(&facts, &missing),
            "this kernel has no tracepoint tcp:tcp_sendmsg_locked: accepted sockets count as their listener's owner's until their first receive or close()"
        );
        let start = HOOKS
            .iter()
            .find(|h| h.program == names::PROG_TIMER_START)
            .unwrap();
        let refused = anyhow::anyhow!("permission denied");
        assert!(
            start
                .lost(&facts, &refused)
                .contains("perf_event_paranoid=2")
        );
        let options = TracerOptions::default();
        let wanted: Vec<&str> = HOOKS
            .iter()
            .filter(|h| h.wanted(&facts, &options, &[]))
            .map(|h| h.program)
            .collect();
        assert_eq!(
            wanted,
            [
                names::PROG_SET_STATE,
                names::PROG_SENDMSG,
                names::PROG_RCV_SPACE
            ]
        );
    }

    #[test]
    fn state_changes_go_through_the_typed_pair_else_the_raw_pair() {
        let facts = KernelFacts {
            set_state: twtrace_common::SetStateLayout::DEFAULT,
            sock: Some(twtrace_common::SockLayout::UNKNOWN),
            time_wait: twtrace_common::TwConfig::DISABLED,
            fork_child_pid: None,
            reset_reasons: super::super::probe::ResetReasons::default(),
            tw_capacity: 1024,
            tw_alive_at_start: 0,
            perf_event_paranoid: None,
            warnings: Vec::new(),
        };
        let state_changes = |options: &TracerOptions, typed_failed: &[&str]| -> Vec<&str> {
            HOOKS
                .iter()
                .filter(|h| h.feature == Feature::Transitions)
                .filter(|h| h.wanted(&facts, options, typed_failed))
                .map(|h| h.program)
                .collect()
        };
        let typed = [names::PROG_SET_STATE_BTF, names::PROG_SET_STATE_BTF_TWIN];
        let raw = [names::PROG_SET_STATE_RAW, names::PROG_SET_STATE_TWIN];
        let default = TracerOptions::default();
        assert_eq!(state_changes(&default, &[]), typed);
        assert_eq!(state_changes(&default, &["inet_sock_set_state"]), raw);
        // Another tracepoint's refusal changes nothing here.
        assert_eq!(state_changes(&default, &["timer_start"]), typed);
        let forced = TracerOptions {
            raw_tracepoints: true,
            ..TracerOptions::default()
        };
        assert_eq!(state_changes(&forced, &[]), raw);
    }
}
