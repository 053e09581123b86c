//! Hostile ring-buffer records: whatever bytes the kernel side hands over
//! (short, truncated, unknown states or kinds), the decoder must reject
//! them with an error and the teardown model must take whatever it
//! accepts, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twtrace::{event, model::TeardownModel};

fuzz_target!(|data: &[u8]| {
    let mut model = TeardownModel::new(Some(250));
    let mut out = Vec::new();
    // The input is a run of records, each prefixed by its length byte, so
    // the model sees sequences (births, cancels, re-arms of one socket).
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (record, next) = tail.split_at(len);
        if let Ok(event) = event::decode(record) {
            // As the session does at a namespace's first event.
            let netns = u64::from(event.transition.netns);
            if !model.knows_namespace(netns) {
                model.set_port_range(netns, (32768, 60999));
            }
            model.push(event, &mut out);
        }
        rest = next;
    }
    // The kernel's word on orphans, at times the records themselves chose.
    for (id, birth) in model.unresolved_orphans(u64::MAX / 4, 0, 64) {
        model.resolve_orphan(id, birth.ts_ns.wrapping_mul(3) / 2, &mut out);
    }
    model.flush(u64::MAX / 2, &mut out);
    model.finish(&mut out);
});
