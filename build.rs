//! With the `torch` feature, torch-sys reports libtorch's library directory (DEP_TCH_LIBTORCH_LIB,
//! through the optional torch-sys dependency): it goes into the rpath of the binary and the tests,
//! so they find libtorch_cpu.so and libc10.so at run time without LD_LIBRARY_PATH. Without the
//! feature this does nothing.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if std::env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("unix") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
            // A CUDA libtorch registers its GPU backend when libtorch_cuda.so is loaded, but
            // nothing here names a symbol of it, so the linker's --as-needed would drop it and
            // `--device cuda` would see no GPU: keep it needed.
            if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
                println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
            }
        }
    }
}
