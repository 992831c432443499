//! Compiles the C datapath under /bpf with clang-19 and generates typed
//! libbpf-rs skeletons (programs, maps, and Rust types for map keys/values
//! from BTF). Only UAPI headers are used, so the build does not depend on the
//! build host's kernel.

use libbpf_cargo::SkeletonBuilder;
use std::path::PathBuf;
use std::{env, ffi::OsString};

const OBJECTS: &[&str] = &["sock", "netdev", "sockdestroy"];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../bpf");
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    // UAPI headers include <asm/types.h>, which lives in the multiarch directory.
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").unwrap().as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => panic!("unsupported target architecture {other} for the BPF build"),
    };
    for obj in OBJECTS {
        let src = root.join(format!("{obj}.bpf.c"));
        let args: Vec<OsString> = vec![
            "-I".into(),
            root.clone().into(),
            "-I".into(),
            format!("/usr/include/{arch}").into(),
            "-mcpu=v3".into(),
            "-Wall".into(),
            "-Werror".into(),
        ];
        SkeletonBuilder::new()
            .source(&src)
            .clang(&clang)
            .clang_args(args)
            .build_and_generate(out.join(format!("{obj}.skel.rs")))
            .unwrap_or_else(|e| {
                panic!("building {}: {e:#}\n(is clang-19 installed? run scripts/install-deps.sh)", src.display())
            });
    }
}
