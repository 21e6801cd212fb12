//! The library's one state: the transport, the device's description, the
//! command buffer of asynchronous work and the parameter layouts of the
//! kernels in use. Both API faces (driver and runtime) call into it.
//!
//! Asynchronous calls are appended to one command buffer (all streams, in
//! issue order: see docs/protocol.md, "Command buffers"), sent at the next
//! synchronisation point or when full. An error of queued work surfaces at
//! that point, as CUDA reports errors of asynchronous work. A fault (the
//! host's DEVICE_ERROR or TIMEOUT) loses the context: every later call
//! answers that error, as CUDA's sticky errors do.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use vgpu::executor::cuda_api::{self as api, ParamLayout, Record};
use vgpu::protocol::{read_obj, Opcode, Status};

use crate::cu;
use crate::transport::{self, Transport};

/// Flush the command buffer past this many bytes of records...
const FLUSH_BYTES: usize = 8 << 20;
/// ... or this many records ...
const FLUSH_RECORDS: usize = 16384;
/// ... or this many DtoH bytes.
const FLUSH_DTOH: usize = 16 << 20;
/// Copies larger than this go as synchronous chunks of this size.
pub const CHUNK: usize = 16 << 20;

pub type CuResult<T> = Result<T, u32>;

/// What CU_DEVICE_INFO said.
#[derive(Debug, Clone)]
pub struct Device {
    /// The host's CUDA API version (`api_version`).
    pub api_version: u32,
    pub name: [u8; 256],
    pub uuid: [u8; 16],
    pub total_mem: u64,
    pub attrs: Vec<i32>,
}

impl Device {
    pub fn attr(&self, i: i32) -> i32 {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.attrs.get(i).copied())
            .unwrap_or(0)
    }
}

/// Where the bytes of a queued DtoH go.
struct PendingDtoH {
    host: usize,
    len: usize,
}

pub struct Client {
    transport: Box<dyn Transport>,
    pub device: Device,
    records: Vec<u8>,
    record_count: usize,
    dtoh: Vec<PendingDtoH>,
    dtoh_bytes: usize,
    /// Sticky error after a fault.
    lost: Option<u32>,
    /// Parameter layouts of the functions handed out.
    layouts: HashMap<u64, ParamLayout>,
    /// The device allocations (base -> size), to tell device pointers from
    /// host pointers for cudaMemcpyDefault.
    allocs: std::collections::BTreeMap<u64, u64>,
    /// The host's cuBLAS version, once CU_BLAS_INIT answered.
    blas_version: Option<u32>,
}

/// Maps a request status (not OK) to the CUresult a program sees.
pub fn status_result(status: u32) -> u32 {
    match Status::from_u32(status) {
        Some(Status::Unsupported) => cu::NOT_SUPPORTED,
        Some(Status::NoResources) => cu::OUT_OF_MEMORY,
        Some(Status::DeviceError) => cu::LAUNCH_FAILED,
        Some(Status::Timeout) => cu::LAUNCH_TIMEOUT,
        Some(Status::NotFound) => cu::INVALID_HANDLE,
        Some(Status::BadRequest) | Some(Status::TooLarge) => cu::INVALID_VALUE,
        _ => cu::UNKNOWN,
    }
}

static CLIENT: Mutex<Option<Result<Client, u32>>> = Mutex::new(None);

/// The client, connected and initialised on first use; the error of the
/// first attempt is kept (a machine without a device stays without one).
pub fn with<T>(f: impl FnOnce(&mut Client) -> CuResult<T>) -> CuResult<T> {
    let mut g: MutexGuard<_> = CLIENT.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        *g = Some(Client::connect());
    }
    match g.as_mut() {
        Some(Ok(c)) => {
            if let Some(e) = c.lost {
                return Err(e);
            }
            f(c)
        }
        Some(Err(e)) => Err(*e),
        None => Err(cu::NOT_INITIALIZED),
    }
}

impl Client {
    fn new(transport: Box<dyn Transport>) -> Client {
        Client {
            transport,
            device: Device {
                api_version: api::API_VERSION,
                name: [0; 256],
                uuid: [0; 16],
                total_mem: 0,
                attrs: Vec::new(),
            },
            records: Vec::new(),
            record_count: 0,
            dtoh: Vec::new(),
            dtoh_bytes: 0,
            lost: None,
            layouts: HashMap::new(),
            allocs: std::collections::BTreeMap::new(),
            blas_version: None,
        }
    }

    /// True when the host runs cuBLAS calls (API version 2 and CU_BLAS_INIT
    /// answered).
    pub fn has_blas(&self) -> bool {
        self.blas_version.is_some()
    }

    /// Asks the host for its cuBLAS once (CU_BLAS_INIT creates the VM's
    /// handle there); its version.
    pub fn blas_init(&mut self) -> CuResult<u32> {
        if let Some(v) = self.blas_version {
            return Ok(v);
        }
        if self.device.api_version < api::BLAS_API_VERSION {
            return Err(cu::NOT_SUPPORTED);
        }
        let out = self.call(Opcode::CuBlasInit, &[], 4)?;
        let v = read_obj::<vm_memory::endian::Le32>(&out, 0)
            .map(u32::from)
            .ok_or(cu::UNKNOWN)?;
        self.blas_version = Some(v);
        Ok(v)
    }

    pub fn mem_alloc(&mut self, size: u64) -> CuResult<u64> {
        let d = self.call_u64(Opcode::CuMemAlloc, &size.to_le_bytes())?;
        self.allocs.insert(d, size);
        Ok(d)
    }

    pub fn mem_free(&mut self, dptr: u64) -> CuResult<()> {
        self.call(Opcode::CuMemFree, &dptr.to_le_bytes(), 0)?;
        self.allocs.remove(&dptr);
        Ok(())
    }

    /// True when `p` lies in one of this program's device allocations.
    pub fn is_device(&self, p: u64) -> bool {
        self.allocs
            .range(..=p)
            .next_back()
            .is_some_and(|(&b, &n)| p - b < n)
    }

    fn connect() -> Result<Client, u32> {
        let transport = transport::open().map_err(|e| {
            log::info!("vgpu cuda: no transport: {e}");
            cu::NO_DEVICE
        })?;
        let mut c = Client::new(transport);
        let out = match c.raw(Opcode::CuDeviceInfo, &[], 4096) {
            // No CUDA device on the host (CPU executor) or a host without
            // the CUDA API: the documented "no device".
            Err(e) if e == cu::NOT_SUPPORTED => return Err(cu::NO_DEVICE),
            other => other?,
        };
        let w: api::DeviceInfoWire = read_obj(&out, 0).ok_or(cu::UNKNOWN)?;
        if u32::from(w.api_version) < api::MIN_API_VERSION {
            return Err(cu::NO_DEVICE);
        }
        let n = (u32::from(w.attr_count) as usize).min(1024);
        let attrs = (0..n)
            .map(|i| {
                read_obj::<vm_memory::endian::Le32>(&out, api::DEVICE_INFO_SIZE + 4 * i)
                    .map(|v| u32::from(v) as i32)
                    .unwrap_or(0)
            })
            .collect();
        c.device = Device {
            api_version: w.api_version.into(),
            name: w.name,
            uuid: w.uuid,
            total_mem: w.total_mem.into(),
            attrs,
        };
        Ok(c)
    }

    /// One request; the reply's data when `result` is 0.
    fn raw(&mut self, op: Opcode, payload: &[u8], out_cap: usize) -> CuResult<Vec<u8>> {
        let a = self
            .transport
            .call(op, payload, api::REPLY_SIZE + out_cap)
            .map_err(|e| {
                log::warn!("vgpu cuda: {op:?}: {e}");
                cu::UNKNOWN
            })?;
        if a.status != Status::Ok as u32 {
            let r = status_result(a.status);
            if matches!(
                Status::from_u32(a.status),
                Some(Status::DeviceError) | Some(Status::Timeout)
            ) {
                self.lost = Some(r);
            }
            return Err(r);
        }
        let reply: api::ReplyWire = read_obj(&a.output, 0).ok_or(cu::UNKNOWN)?;
        match u32::from(reply.result) {
            0 => Ok(a.output.get(api::REPLY_SIZE..).unwrap_or_default().to_vec()),
            e => Err(e),
        }
    }

    /// A synchronous call: the queued work goes first (it was issued first).
    pub fn call(&mut self, op: Opcode, payload: &[u8], out_cap: usize) -> CuResult<Vec<u8>> {
        self.flush()?;
        self.raw(op, payload, out_cap)
    }

    /// A call whose output is one le64.
    pub fn call_u64(&mut self, op: Opcode, payload: &[u8]) -> CuResult<u64> {
        let out = self.call(op, payload, 8)?;
        read_obj::<vm_memory::endian::Le64>(&out, 0)
            .map(u64::from)
            .ok_or(cu::UNKNOWN)
    }

    /// Sends the queued work and waits for it; returns the first error of
    /// the queued work, if any.
    pub fn flush(&mut self) -> CuResult<()> {
        if self.record_count == 0 {
            return Ok(());
        }
        let payload = api::command_buffer_payload(self.record_count as u32, &self.records);
        let dtoh = std::mem::take(&mut self.dtoh);
        let dtoh_bytes = self.dtoh_bytes;
        self.records.clear();
        self.record_count = 0;
        self.dtoh_bytes = 0;
        let a = self
            .transport
            .call(
                Opcode::CuCommandBuffer,
                &payload,
                api::REPLY_SIZE + dtoh_bytes,
            )
            .map_err(|e| {
                log::warn!("vgpu cuda: command buffer: {e}");
                cu::UNKNOWN
            })?;
        if a.status != Status::Ok as u32 {
            let r = status_result(a.status);
            if matches!(
                Status::from_u32(a.status),
                Some(Status::DeviceError) | Some(Status::Timeout)
            ) {
                self.lost = Some(r);
            }
            return Err(r);
        }
        let reply: api::ReplyWire = read_obj(&a.output, 0).ok_or(cu::UNKNOWN)?;
        // The DtoH bytes of the records that ran, in order.
        let mut off = api::REPLY_SIZE;
        for d in dtoh {
            let Some(src) = a.output.get(off..off + d.len) else {
                break;
            };
            // SAFETY: the program gave this host pointer and length to an
            // asynchronous copy; CUDA requires the memory to stay valid
            // until the stream is synchronised, which is now.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.host as *mut u8, d.len) };
            off += d.len;
        }
        match u32::from(reply.result) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Appends one asynchronous record; `dtoh_host` is where the bytes of a
    /// DtoH record go at the flush.
    pub fn enqueue(&mut self, stream: u64, rec: Record<'_>, dtoh_host: usize) -> CuResult<()> {
        let size = api::record_size(&rec);
        let dlen = match rec {
            Record::DtoH { len, .. } => len as usize,
            _ => 0,
        };
        if self.record_count > 0
            && (self.records.len() + size > FLUSH_BYTES
                || self.record_count + 1 > FLUSH_RECORDS
                || self.dtoh_bytes + dlen > FLUSH_DTOH)
        {
            self.flush()?;
        }
        api::encode_record(&mut self.records, stream, &rec);
        self.record_count += 1;
        if dlen > 0 {
            self.dtoh.push(PendingDtoH {
                host: dtoh_host,
                len: dlen,
            });
            self.dtoh_bytes += dlen;
        }
        Ok(())
    }

    /// Host to device, asynchronous on `stream` when small, else as
    /// synchronous chunks after the queued work.
    pub fn htod(&mut self, stream: u64, dst: u64, src: &[u8]) -> CuResult<()> {
        if src.len() <= CHUNK / 4 {
            return self.enqueue(stream, Record::HtoD { dst, data: src }, 0);
        }
        self.flush()?;
        for (i, chunk) in src.chunks(CHUNK).enumerate() {
            let mut p = (dst + (i * CHUNK) as u64).to_le_bytes().to_vec();
            p.extend_from_slice(chunk);
            self.raw(Opcode::CuMemcpyHtoD, &p, 0)?;
        }
        Ok(())
    }

    /// Device to host: small copies are queued (the bytes land at the
    /// flush), large ones go as synchronous chunks.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes until the next flush.
    pub unsafe fn dtoh(&mut self, stream: u64, dst: *mut u8, src: u64, len: usize) -> CuResult<()> {
        if len <= CHUNK / 4 {
            return self.enqueue(
                stream,
                Record::DtoH {
                    src,
                    len: len as u64,
                },
                dst as usize,
            );
        }
        self.flush()?;
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let mut p = (src + done as u64).to_le_bytes().to_vec();
            p.extend((n as u64).to_le_bytes());
            let out = self.raw(Opcode::CuMemcpyDtoH, &p, n)?;
            if out.len() != n {
                return Err(cu::UNKNOWN);
            }
            // SAFETY: the caller guarantees `dst` holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), dst.add(done), n) };
            done += n;
        }
        Ok(())
    }

    pub fn module_load(&mut self, image: &[u8]) -> CuResult<u64> {
        self.call_u64(Opcode::CuModuleLoad, image)
    }

    pub fn get_function(&mut self, module: u64, name: &[u8]) -> CuResult<u64> {
        let mut p = module.to_le_bytes().to_vec();
        p.extend_from_slice(name);
        let out = self.call(Opcode::CuGetFunction, &p, 16 + 8 * api::MAX_FUNCTION_PARAMS)?;
        let (h, layout) = ParamLayout::decode(&out).map_err(|_| cu::UNKNOWN)?;
        self.layouts.insert(h, layout);
        Ok(h)
    }

    pub fn layout(&self, function: u64) -> Option<&ParamLayout> {
        self.layouts.get(&function)
    }

    /// Queues a launch; `args[i]` points at parameter i's value (the
    /// `kernelParams` convention).
    ///
    /// # Safety
    /// `args` must hold one valid pointer per kernel parameter, each to at
    /// least the parameter's size of bytes.
    pub unsafe fn launch(
        &mut self,
        function: u64,
        grid: [u32; 3],
        block: [u32; 3],
        shared_mem: u32,
        stream: u64,
        args: *const *const u8,
    ) -> CuResult<()> {
        let layout = self.layouts.get(&function).ok_or(cu::INVALID_HANDLE)?;
        let mut params = vec![0u8; layout.bytes as usize];
        if !layout.params.is_empty() && args.is_null() {
            return Err(cu::INVALID_VALUE);
        }
        for (i, &(off, size)) in layout.params.iter().enumerate() {
            // SAFETY: the caller guarantees one pointer per parameter.
            let src = unsafe { *args.add(i) };
            if src.is_null() {
                return Err(cu::INVALID_VALUE);
            }
            let (off, size) = (off as usize, size as usize);
            // SAFETY: `src` points at `size` bytes (caller); the layout's
            // ranges lie inside `params` (ParamLayout::new checked them).
            unsafe { std::ptr::copy_nonoverlapping(src, params.as_mut_ptr().add(off), size) };
        }
        self.enqueue(
            stream,
            Record::Launch {
                function,
                grid,
                block,
                shared_mem,
                params: &params,
            },
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    //! The command-buffer rules, with the host's own parser
    //! (`parse_command_buffer`) standing in for the GPU this machine lacks:
    //! what the library sends must parse, DtoH bytes land where the program
    //! asked, full buffers flush, and a failing record surfaces at the sync.
    use super::*;
    use crate::transport::Answer;
    use std::sync::{Arc, Mutex as StdMutex};

    /// Parses every command buffer as the daemon does; answers DtoH records
    /// with bytes 0, 1, 2, ... and fails record `fail_at` if set.
    struct HostParser {
        buffers: Arc<StdMutex<Vec<usize>>>,
        fail_at: Option<u32>,
    }

    impl Transport for HostParser {
        fn call(&mut self, op: Opcode, p: &[u8], cap: usize) -> Result<Answer, String> {
            if op == Opcode::CuBlasInit {
                assert!(p.is_empty() && cap >= api::REPLY_SIZE + 4);
                self.buffers.lock().unwrap().push(usize::MAX);
                return Ok(Answer {
                    status: Status::Ok as u32,
                    output: api::reply(0, 0, &130001u32.to_le_bytes()),
                });
            }
            if op != Opcode::CuCommandBuffer {
                return Ok(Answer {
                    status: Status::Ok as u32,
                    output: api::reply(0, 0, &[]),
                });
            }
            let cb = match api::parse_command_buffer(p) {
                Ok(cb) => cb,
                Err(e) => {
                    return Ok(Answer {
                        status: e.status() as u32,
                        output: vec![],
                    })
                }
            };
            assert!(cap >= api::REPLY_SIZE + cb.dtoh_bytes as usize);
            self.buffers.lock().unwrap().push(cb.commands.len());
            let mut data = Vec::new();
            for (i, c) in cb.commands.iter().enumerate() {
                if Some(i as u32) == self.fail_at {
                    return Ok(Answer {
                        status: 0,
                        output: api::reply(cu::INVALID_VALUE, i as u32, &data),
                    });
                }
                if let Record::DtoH { len, .. } = c.record {
                    data.extend((0..len).map(|b| b as u8));
                }
            }
            Ok(Answer {
                status: 0,
                output: api::reply(0, api::ALL_DONE, &data),
            })
        }
    }

    fn client(fail_at: Option<u32>) -> (Client, Arc<StdMutex<Vec<usize>>>) {
        let buffers = Arc::new(StdMutex::new(Vec::new()));
        let t = HostParser {
            buffers: buffers.clone(),
            fail_at,
        };
        (Client::new(Box::new(t)), buffers)
    }

    #[test]
    fn queued_work_parses_and_dtoh_lands_in_order() {
        let (mut c, bufs) = client(None);
        let mut a = [0xffu8; 4];
        let mut b = [0xffu8; 3];
        c.htod(0, 0x1000, &[1, 2, 3]).unwrap();
        c.enqueue(
            7,
            Record::Memset {
                dst: 0x1000,
                count: 4,
                value: 9,
                elem_size: 4,
            },
            0,
        )
        .unwrap();
        // SAFETY: the arrays outlive the flush below.
        unsafe {
            c.dtoh(0, a.as_mut_ptr(), 0x1000, 4).unwrap();
            c.dtoh(7, b.as_mut_ptr(), 0x2000, 3).unwrap();
        }
        assert_eq!(a, [0xff; 4], "nothing lands before the sync");
        c.flush().unwrap();
        assert_eq!((a, b), ([0, 1, 2, 3], [0, 1, 2]));
        assert_eq!(*bufs.lock().unwrap(), vec![4]);
        c.flush().unwrap();
        assert_eq!(bufs.lock().unwrap().len(), 1, "an empty buffer is not sent");
    }

    #[test]
    fn full_buffers_flush_on_their_own() {
        let (mut c, bufs) = client(None);
        for _ in 0..FLUSH_RECORDS + 10 {
            c.enqueue(0, Record::EventRecord { event: 1 }, 0).unwrap();
        }
        c.flush().unwrap();
        assert_eq!(*bufs.lock().unwrap(), vec![FLUSH_RECORDS, 10]);
    }

    #[test]
    fn an_error_of_queued_work_surfaces_at_the_sync() {
        let (mut c, _) = client(Some(1));
        let mut a = [0u8; 2];
        // SAFETY: `a` outlives the flush.
        unsafe { c.dtoh(0, a.as_mut_ptr(), 0x1000, 2).unwrap() };
        c.enqueue(0, Record::EventRecord { event: 1 }, 0).unwrap();
        assert_eq!(c.flush(), Err(cu::INVALID_VALUE));
        assert_eq!(a, [0, 1], "records before the failing one completed");
        // The next call is not poisoned: only faults are sticky.
        assert!(c.call(Opcode::CuMemInfo, &[], 16).is_ok());
    }

    #[test]
    fn launch_packs_parameters_at_the_kernels_offsets() {
        let (mut c, _) = client(None);
        c.layouts
            .insert(5, ParamLayout::new(vec![(0, 4), (8, 8)]).unwrap());
        let (x, p) = (7i32, 0x1234_5678_9abc_def0u64);
        let args = [&x as *const i32 as *const u8, &p as *const u64 as *const u8];
        // SAFETY: one pointer per parameter, each to its size of bytes.
        unsafe { c.launch(5, [1; 3], [32, 1, 1], 0, 0, args.as_ptr()) }.unwrap();
        let cb = api::command_buffer_payload(c.record_count as u32, &c.records);
        let parsed = api::parse_command_buffer(&cb).unwrap();
        let Record::Launch { params, .. } = &parsed.commands[0].record else {
            panic!("not a launch");
        };
        assert_eq!(params.len(), 16);
        assert_eq!(&params[0..4], &7i32.to_le_bytes());
        assert_eq!(&params[8..16], &p.to_le_bytes());
        // An unknown function is an error, not a read through `args`.
        // SAFETY: args is not read for an unknown function.
        assert_eq!(
            unsafe { c.launch(6, [1; 3], [1; 3], 0, 0, std::ptr::null()) },
            Err(cu::INVALID_HANDLE)
        );
    }

    #[test]
    fn gemm_records_parse_as_the_host_reads_them() {
        let (mut c, bufs) = client(None);
        // A host of API version 1 has no cuBLAS: no request is made.
        c.device.api_version = 1;
        assert_eq!(c.blas_init(), Err(cu::NOT_SUPPORTED));
        assert!(!c.has_blas());
        c.device.api_version = api::BLAS_API_VERSION;
        assert_eq!(c.blas_init(), Ok(130001));
        assert_eq!(c.blas_init(), Ok(130001), "asked once");
        assert_eq!(*bufs.lock().unwrap(), vec![usize::MAX]);
        let g = api::Gemm {
            op: api::blas::GEMM_EX,
            math_mode: api::blas::TF32_TENSOR_OP_MATH,
            transa: api::blas::OP_T,
            m: 64,
            n: 32,
            k: 16,
            a: 0x7f00_0000_1000,
            lda: 16,
            b: 0x7f00_0000_2000,
            ldb: 16,
            c: 0x7f00_0000_3000,
            ldc: 64,
            compute_type: api::blas::COMPUTE_32F_FAST_TF32,
            algo: 99,
            alpha: 2f32.to_bits(),
            beta: (-1f32).to_bits(),
            ..Default::default()
        };
        assert_eq!(g.validate(), Ok(()));
        c.enqueue(0x55, Record::Gemm(g), 0).unwrap();
        let cb = api::command_buffer_payload(c.record_count as u32, &c.records);
        let parsed = api::parse_command_buffer(&cb).unwrap();
        assert_eq!(parsed.commands[0].stream, 0x55);
        assert_eq!(parsed.commands[0].record, Record::Gemm(g));
        c.flush().unwrap();
        assert_eq!(*bufs.lock().unwrap(), vec![usize::MAX, 1]);
    }

    #[test]
    fn statuses_map_to_cuda_errors() {
        assert_eq!(status_result(Status::Unsupported as u32), cu::NOT_SUPPORTED);
        assert_eq!(status_result(Status::DeviceError as u32), cu::LAUNCH_FAILED);
        assert_eq!(status_result(Status::Timeout as u32), cu::LAUNCH_TIMEOUT);
        assert_eq!(status_result(Status::NoResources as u32), cu::OUT_OF_MEMORY);
        assert_eq!(status_result(77), cu::UNKNOWN);
    }
}
