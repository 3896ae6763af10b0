//! The GGUF reader on arbitrary bytes: it must return (Ok or a typed error), never panic, and
//! never allocate more than the input justifies (libFuzzer's -rss_limit_mb catches that).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = abf::gguf::GgufFile::parse(data) {
        // what inspect does next with a parsed file
        let _ = abf::gguf::read_recipe(&file.metadata);
        for i in 0..file.tensors.len() {
            let _ = file.tensor_bytes(data, i);
        }
    }
});
