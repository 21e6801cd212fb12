//! Worker process of the CUDA executor: runs one VM's CUDA remoting calls so
//! that a faulting guest kernel ends only this process (see
//! `src/executor/worker/`). Started by the daemon, not by hand.

fn main() {
    env_logger::init();
    std::process::exit(vgpu::executor::worker::worker_main());
}
