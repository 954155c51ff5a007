//! With the `torch` feature, torch-sys reports libtorch's library directory (DEP_TCH_LIBTORCH_LIB,
//! through the optional torch-sys dependency): it goes into the rpath of the binary and the tests,
//! so they find libtorch_cpu.so and libc10.so at run time without LD_LIBRARY_PATH. Without the
//! feature this does nothing.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if std::env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("unix") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
