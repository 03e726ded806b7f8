#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vilvik_keys_fuzz::create_key_request(data));
