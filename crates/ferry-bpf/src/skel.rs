//! The generated libbpf-rs skeletons (see build.rs).

#[allow(clippy::all, non_camel_case_types, non_snake_case, dead_code, unused_imports, missing_docs)]
pub mod sock {
    include!(concat!(env!("OUT_DIR"), "/sock.skel.rs"));
}

#[allow(clippy::all, non_camel_case_types, non_snake_case, dead_code, unused_imports, missing_docs)]
pub mod netdev {
    include!(concat!(env!("OUT_DIR"), "/netdev.skel.rs"));
}

#[allow(clippy::all, non_camel_case_types, non_snake_case, dead_code, unused_imports, missing_docs)]
pub mod sockdestroy {
    include!(concat!(env!("OUT_DIR"), "/sockdestroy.skel.rs"));
}
