pub mod proto {
    tonic::include_proto!("vilvik.keys.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vilvik_keys_descriptor");
}
