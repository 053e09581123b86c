//! Hostile ring-buffer records: whatever bytes the kernel side hands over
//! (short, truncated, unknown states or kinds), the decoder must reject
//! them with an error and the teardown model must take whatever it
//! accepts, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twtrace::{event, model::TeardownModel};

fuzz_target!(|data: &[u8]| {
    let mut model = TeardownModel::new(Some(250)).with_port_range(Some((32768, 60999)));
    let mut out = Vec::new();
    // The input is a run of records, each prefixed by its length byte, so
    // the model sees sequences (births, cancels, re-arms of one socket).
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (record, next) = tail.split_at(len);
        if let Ok(event) = event::decode(record) {
            model.push(event, &mut out);
        }
        rest = next;
    }
    model.flush(u64::MAX / 2, &mut out);
    model.finish(&mut out);
});
