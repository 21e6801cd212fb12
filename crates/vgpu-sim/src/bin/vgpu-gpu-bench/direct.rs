//! Direct cudarc baselines for both sections: the same kernels the
//! executor runs (`kernels/vgpu_kernels.ptx`), launched from this process on a
//! context of its own, with pinned host buffers and no event tracking (each
//! buffer is used on one stream only), i.e. the fastest plain cudarc does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use vgpu::executor::cuda::KERNELS_PTX;

use crate::Res;

pub struct Direct {
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    k_scalar: CudaFunction,
    k_vadd: CudaFunction,
    k_sgemm: CudaFunction,
}

const ONE: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (1, 1, 1),
    shared_mem_bytes: 0,
};

/// Result of a direct SGEMM run.
pub struct Sgemm {
    /// Best of the runs, copies of A, B and C from and to pinned memory included.
    pub with_copies: Duration,
    /// Best of the runs, kernel only (device-resident A, B, C).
    pub kernel_only: Duration,
    pub c: Vec<f32>,
}

impl Direct {
    pub fn new(gpu: usize) -> Res<Direct> {
        let ctx = CudaContext::new(gpu)?;
        // SAFETY: every buffer below is allocated, used and freed on one
        // stream, which is synchronized before the host reads results.
        unsafe { ctx.disable_event_tracking() };
        let module = ctx.load_module(Ptx::from_src(KERNELS_PTX))?;
        Ok(Direct {
            k_scalar: module.load_function("scalar_add_i32")?,
            k_vadd: module.load_function("vector_add_f32")?,
            k_sgemm: module.load_function("sgemm_f32")?,
            _module: module,
            ctx,
        })
    }

    /// SCALAR_ADD round trips, one at a time: (8 B copy in,) kernel, 4 B copy
    /// out, synchronize.
    pub fn scalar_latency(&self, iters: usize, copy_in: bool) -> Res<Vec<Duration>> {
        let stream = self.ctx.new_stream()?;
        // SAFETY: filled before use.
        let mut pin_in = unsafe { self.ctx.alloc_pinned_with_flags::<i32>(2, 0) }?;
        pin_in.as_mut_slice()?.copy_from_slice(&[40, 2]);
        // SAFETY: written by the copy out before it is read.
        let mut pin_out = unsafe { self.ctx.alloc_pinned_with_flags::<i32>(1, 0) }?;
        let mut d_in = stream.alloc_zeros::<i32>(2)?;
        let mut d_out = stream.alloc_zeros::<i32>(1)?;
        let (a, b) = (40i32, 2i32);
        let mut one = || -> Res<()> {
            if copy_in {
                stream.memcpy_htod(&pin_in, &mut d_in)?;
            }
            let mut l = stream.launch_builder(&self.k_scalar);
            l.arg(&a).arg(&b).arg(&mut d_out);
            // SAFETY: scalar_add_i32(int, int, int*).
            unsafe { l.launch(ONE) }?;
            stream.memcpy_dtoh(&d_out, &mut pin_out)?;
            stream.synchronize()?;
            Ok(())
        };
        for _ in 0..1000 {
            one()?;
        }
        let mut v = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            one()?;
            v.push(t.elapsed());
        }
        if pin_out.as_slice()?[0] != 42 {
            return Err("direct SCALAR_ADD wrong".into());
        }
        Ok(v)
    }

    /// SCALAR_ADD (kernel with the operands as parameters, 4 B copy out,
    /// synchronize) from `threads` threads, one stream each, for `span`.
    /// Returns completed operations per second.
    pub fn scalar_throughput(&self, threads: usize, span: Duration) -> Res<f64> {
        let start = Arc::new(Barrier::new(threads + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (ctx, k) = (self.ctx.clone(), self.k_scalar.clone());
                let (start, stop, done) = (start.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    let run = || -> Res<()> {
                        let stream = ctx.new_stream()?;
                        // SAFETY: written by the copy out before it is read.
                        let mut pin_out = unsafe { ctx.alloc_pinned_with_flags::<i32>(1, 0) }?;
                        let mut d_out = stream.alloc_zeros::<i32>(1)?;
                        let (a, b) = (t as i32, 1000i32);
                        let mut one = || -> Res<()> {
                            let mut l = stream.launch_builder(&k);
                            l.arg(&a).arg(&b).arg(&mut d_out);
                            // SAFETY: scalar_add_i32(int, int, int*).
                            unsafe { l.launch(ONE) }?;
                            stream.memcpy_dtoh(&d_out, &mut pin_out)?;
                            stream.synchronize()?;
                            Ok(())
                        };
                        for _ in 0..200 {
                            one()?;
                        }
                        start.wait();
                        while !stop.load(Ordering::Relaxed) {
                            one()?;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        if pin_out.as_slice()?[0] != a + b {
                            return Err("direct SCALAR_ADD wrong".into());
                        }
                        Ok(())
                    };
                    let r = run().map_err(|e| e.to_string());
                    if r.is_err() {
                        // Do not leave the others waiting at the barrier.
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        start.wait();
        let before = done.load(Ordering::Relaxed);
        let t = Instant::now();
        std::thread::sleep(span);
        let count = done.load(Ordering::Relaxed) - before;
        let elapsed = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| "direct thread panicked")??;
        }
        Ok(count as f64 / elapsed.as_secs_f64())
    }

    /// VECTOR_ADD_F32 from pinned buffers, copies included: p50 of `reps`.
    pub fn vector_add(&self, a: &[f32], b: &[f32], reps: usize) -> Res<(Duration, Vec<f32>)> {
        let n = a.len();
        let stream = self.ctx.new_stream()?;
        // SAFETY: filled before use / written by the copy out before read.
        let mut ha = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(n, 0) }?;
        let mut hb = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(n, 0) }?;
        let mut ho = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(n, 0) }?;
        ha.as_mut_slice()?.copy_from_slice(a);
        hb.as_mut_slice()?.copy_from_slice(b);
        let mut da = stream.alloc_zeros::<f32>(n)?;
        let mut db = stream.alloc_zeros::<f32>(n)?;
        let mut dout = stream.alloc_zeros::<f32>(n)?;
        let n32 = n as u32;
        let cfg = LaunchConfig {
            grid_dim: (n32.div_ceil(256).clamp(1, 65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut run = || -> Res<()> {
            stream.memcpy_htod(&ha, &mut da)?;
            stream.memcpy_htod(&hb, &mut db)?;
            let mut l = stream.launch_builder(&self.k_vadd);
            l.arg(&da).arg(&db).arg(&mut dout).arg(&n32);
            // SAFETY: vector_add_f32(const float*, const float*, float*, unsigned).
            unsafe { l.launch(cfg) }?;
            stream.memcpy_dtoh(&dout, &mut ho)?;
            stream.synchronize()?;
            Ok(())
        };
        run()?;
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            run()?;
            v.push(t.elapsed());
        }
        v.sort();
        Ok((v[v.len() / 2], ho.as_slice()?.to_vec()))
    }

    /// Pinned copies of `len` bytes host-to-device and device-to-host, each
    /// synchronized: p50 of `reps` each.
    pub fn pinned_copies(&self, len: usize, reps: usize) -> Res<(Duration, Duration)> {
        let stream = self.ctx.new_stream()?;
        // SAFETY: written by the copies before it is read (never read here).
        let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len, 0) }?;
        let mut dev = stream.alloc_zeros::<u8>(len)?;
        let (mut up, mut down) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
        for i in 0..=reps {
            let t = Instant::now();
            stream.memcpy_htod(&host, &mut dev)?;
            stream.synchronize()?;
            let d_up = t.elapsed();
            let t = Instant::now();
            stream.memcpy_dtoh(&dev, &mut host)?;
            stream.synchronize()?;
            if i > 0 {
                up.push(d_up);
                down.push(t.elapsed());
            }
        }
        up.sort();
        down.sort();
        Ok((up[up.len() / 2], down[down.len() / 2]))
    }

    /// SGEMM_F32 m = n = k = `dim` with the executor's kernel: best of `reps`.
    pub fn sgemm(&self, dim: usize, a: &[f32], b: &[f32], reps: usize) -> Res<Sgemm> {
        let stream = self.ctx.new_stream()?;
        // SAFETY: filled before use / written by the copy out before read.
        let mut ha = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(a.len(), 0) }?;
        let mut hb = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(b.len(), 0) }?;
        let mut hc = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(dim * dim, 0) }?;
        ha.as_mut_slice()?.copy_from_slice(a);
        hb.as_mut_slice()?.copy_from_slice(b);
        let mut da = stream.alloc_zeros::<f32>(a.len())?;
        let mut db = stream.alloc_zeros::<f32>(b.len())?;
        let mut dc = stream.alloc_zeros::<f32>(dim * dim)?;
        let d32 = dim as u32;
        let cfg = LaunchConfig {
            grid_dim: (d32.div_ceil(128), d32.div_ceil(128), 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        stream.memcpy_htod(&ha, &mut da)?;
        stream.memcpy_htod(&hb, &mut db)?;
        let mut kernel = |copies: bool| -> Res<()> {
            if copies {
                stream.memcpy_htod(&ha, &mut da)?;
                stream.memcpy_htod(&hb, &mut db)?;
            }
            let mut l = stream.launch_builder(&self.k_sgemm);
            l.arg(&d32)
                .arg(&d32)
                .arg(&d32)
                .arg(&da)
                .arg(&db)
                .arg(&mut dc);
            // SAFETY: sgemm_f32(unsigned, unsigned, unsigned, const float*, const float*, float*).
            unsafe { l.launch(cfg) }?;
            if copies {
                stream.memcpy_dtoh(&dc, &mut hc)?;
            }
            stream.synchronize()?;
            Ok(())
        };
        kernel(false)?;
        let mut best = |copies: bool| -> Res<Duration> {
            let mut b = Duration::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                kernel(copies)?;
                b = b.min(t.elapsed());
            }
            Ok(b)
        };
        let with_copies = best(true)?;
        let kernel_only = best(false)?;
        Ok(Sgemm {
            with_copies,
            kernel_only,
            c: hc.as_slice()?.to_vec(),
        })
    }

    /// cuBLAS SGEMM, m = n = k = `dim`, row-major as the executor computes
    /// it (Cᵀ = Bᵀ·Aᵀ in column-major): what a user would pick instead.
    /// With copies: A and B in, the multiplication, C out, one after the
    /// other on one stream from pinned memory. Best of `reps`. `None` when
    /// libcublas is absent.
    pub fn cublas_sgemm(
        &self,
        dim: usize,
        a: &[f32],
        b: &[f32],
        reps: usize,
        tf32: bool,
    ) -> Res<Option<Sgemm>> {
        use cudarc::cublas::{result as blas, sys as bsys};
        use std::ffi::c_void;
        if !vgpu::executor::cuda::cublas_present() {
            return Ok(None);
        }
        let stream = self.ctx.new_stream()?;
        // SAFETY: filled before use / written by the copy out before read.
        let mut ha = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(a.len(), 0) }?;
        let mut hb = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(b.len(), 0) }?;
        let mut hc = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(dim * dim, 0) }?;
        ha.as_mut_slice()?.copy_from_slice(a);
        hb.as_mut_slice()?.copy_from_slice(b);
        let mut da = stream.alloc_zeros::<f32>(a.len())?;
        let mut db = stream.alloc_zeros::<f32>(b.len())?;
        let dc = stream.alloc_zeros::<f32>(dim * dim)?;
        stream.memcpy_htod(&ha, &mut da)?;
        stream.memcpy_htod(&hb, &mut db)?;
        let handle = blas::create_handle()?;
        let (pa, pb, pc) = {
            use cudarc::driver::DevicePtr;
            let (pa, _ga) = da.device_ptr(&stream);
            let (pb, _gb) = db.device_ptr(&stream);
            let (pc, _gc) = dc.device_ptr(&stream);
            (pa, pb, pc)
        };
        let compute = if tf32 {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let d = dim as i32;
        let gemm = || -> Res<()> {
            let (alpha, beta) = (1f32, 0f32);
            // SAFETY: the handle is alive, the buffers hold dim×dim floats
            // each and live on `stream`, which the handle uses.
            unsafe {
                blas::set_stream(handle, stream.cu_stream() as bsys::cudaStream_t)?;
                blas::gemm_ex(
                    handle,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    d,
                    d,
                    d,
                    &alpha as *const f32 as *const c_void,
                    pb as *const c_void,
                    bsys::cudaDataType::CUDA_R_32F,
                    d,
                    pa as *const c_void,
                    bsys::cudaDataType::CUDA_R_32F,
                    d,
                    &beta as *const f32 as *const c_void,
                    pc as *mut c_void,
                    bsys::cudaDataType::CUDA_R_32F,
                    d,
                    compute,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
            }
            Ok(())
        };
        let mut run = |copies: bool| -> Res<()> {
            if copies {
                stream.memcpy_htod(&ha, &mut da)?;
                stream.memcpy_htod(&hb, &mut db)?;
            }
            gemm()?;
            if copies {
                stream.memcpy_dtoh(&dc, &mut hc)?;
            }
            stream.synchronize()?;
            Ok(())
        };
        run(true)?;
        let mut best = |copies: bool| -> Res<Duration> {
            let mut b = Duration::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                run(copies)?;
                b = b.min(t.elapsed());
            }
            Ok(b)
        };
        let with_copies = best(true)?;
        let kernel_only = best(false)?;
        // SAFETY: created above, nothing queued any more.
        unsafe { blas::destroy_handle(handle) }?;
        Ok(Some(Sgemm {
            with_copies,
            kernel_only,
            c: hc.as_slice()?.to_vec(),
        }))
    }
}
