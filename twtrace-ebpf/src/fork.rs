//! Following a workload for `twtrace record`: children forked by a
//! followed process are followed too, added in the kernel before they run.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use twtrace_common::counter;

use crate::{
    kernel::{bump, current_pid, read},
    maps::{FILTER, FILTER_PIDS},
};

/// Runs in the parent's context, so the current tgid is the parent's.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let filter = FILTER.load();
    if filter.follow_forks == 0 || FILTER_PIDS.get_ptr(current_pid()).is_none() {
        return 0;
    }
    match read::<i32>(&ctx, filter.fork_child_pid) {
        // A new thread's tid joins too: harmless, owners are tgids.
        Ok(child) if child > 0 => {
            if FILTER_PIDS.insert(child as u32, 1, 0).is_err() {
                bump(counter::FOLLOW_FAILED);
            }
        }
        _ => bump(counter::READ_FAILED),
    }
    0
}
