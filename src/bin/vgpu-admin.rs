//! vgpu-admin: the vgpu control panel (see docs/admin.md).

fn main() -> std::process::ExitCode {
    vgpu::admin::cli::main()
}
