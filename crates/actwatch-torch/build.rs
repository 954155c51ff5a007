//! With the `tch` feature, torch-sys reports libtorch's library directory (DEP_TCH_LIBTORCH_LIB);
//! putting it in the rpath lets this crate's tests find libtorch_cpu.so and libc10.so at run time
//! without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if std::env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("unix") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
