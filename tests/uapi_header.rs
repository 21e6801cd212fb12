//! The C uapi header (guest-driver/include/uapi/vgpu.h) and the Rust contract
//! (src/protocol.rs) must agree: compile a C program against the header, and
//! compare the sizes, offsets and constants it prints with the Rust encoding.

use std::collections::BTreeMap;
use std::process::Command;

use vgpu::protocol::*;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include "uapi/vgpu.h"
#define P(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
#define OFF(s, f) P(#s "." #f, offsetof(struct s, f))
int main(void) {
    P("sizeof.vgpu_req_hdr", sizeof(struct vgpu_req_hdr));
    P("sizeof.vgpu_resp_hdr", sizeof(struct vgpu_resp_hdr));
    P("sizeof.virtio_vgpu_config", sizeof(struct virtio_vgpu_config));
    P("sizeof.vgpu_info", sizeof(struct vgpu_info));
    OFF(vgpu_req_hdr, version); OFF(vgpu_req_hdr, opcode); OFF(vgpu_req_hdr, flags);
    OFF(vgpu_req_hdr, tag); OFF(vgpu_req_hdr, payload_len); OFF(vgpu_req_hdr, reserved);
    OFF(vgpu_resp_hdr, status); OFF(vgpu_resp_hdr, output_len); OFF(vgpu_resp_hdr, tag);
    OFF(vgpu_resp_hdr, dispatch_seq); OFF(vgpu_resp_hdr, queue_ns); OFF(vgpu_resp_hdr, exec_ns);
    OFF(virtio_vgpu_config, magic); OFF(virtio_vgpu_config, version);
    OFF(virtio_vgpu_config, pool_id); OFF(virtio_vgpu_config, priority); OFF(virtio_vgpu_config, vm_id);
    OFF(virtio_vgpu_config, gpu_state); OFF(virtio_vgpu_config, gpu_epoch);
    OFF(vgpu_info, executor); OFF(vgpu_info, gpu_index); OFF(vgpu_info, memory_total);
    OFF(vgpu_info, compute_capability); OFF(vgpu_info, exec_limit_ms); OFF(vgpu_info, name);
    P("VIRTIO_ID_VGPU", VIRTIO_ID_VGPU); P("VGPU_MAGIC", VGPU_MAGIC); P("VGPU_VERSION", VGPU_VERSION);
    P("VGPU_CONFIG_SIZE", VGPU_CONFIG_SIZE); P("VGPU_REQ_VERSION", VGPU_REQ_VERSION);
    P("op.ping", VGPU_OP_PING); P("op.get_info", VGPU_OP_GET_INFO); P("op.busy_wait", VGPU_OP_BUSY_WAIT);
    P("op.scalar_add", VGPU_OP_SCALAR_ADD_I32); P("op.vector_add", VGPU_OP_VECTOR_ADD_F32);
    P("s.ok", VGPU_S_OK); P("s.bad_request", VGPU_S_BAD_REQUEST); P("s.unsupported", VGPU_S_UNSUPPORTED);
    P("s.too_large", VGPU_S_TOO_LARGE); P("s.no_resources", VGPU_S_NO_RESOURCES);
    P("s.device_error", VGPU_S_DEVICE_ERROR); P("s.timeout", VGPU_S_TIMEOUT);
    P("s.cancelled", VGPU_S_CANCELLED); P("s.not_found", VGPU_S_NOT_FOUND); P("s.denied", VGPU_S_DENIED);
    P("prio.low", VGPU_PRIO_LOW); P("prio.medium", VGPU_PRIO_MEDIUM); P("prio.high", VGPU_PRIO_HIGH);
    P("executor.cpu", VGPU_EXECUTOR_CPU); P("executor.cuda", VGPU_EXECUTOR_CUDA);
    return 0;
}
"#;

fn c_values() -> BTreeMap<String, u64> {
    compile_and_run(PROGRAM)
}

fn compile_and_run(program: &str) -> BTreeMap<String, u64> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let bin = dir.path().join("layout");
    std::fs::write(&src, program).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/guest-driver/include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bin).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// Offset of `needle` in the Rust encoding (fields carry distinct bytes).
fn offset_in(bytes: &[u8], needle: &[u8]) -> u64 {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("field present") as u64
}

#[test]
fn c_header_matches_rust_definition() {
    let c = c_values();
    let req = ReqHdr {
        version: 0x1101,
        opcode: 0x2202,
        flags: 0x3303_3303,
        tag: 0x4404_4404_4404_4404,
        payload_len: 0x5505_5505,
        reserved: 0x6606_6606,
    }
    .encode();
    assert_eq!(c["sizeof.vgpu_req_hdr"], req.len() as u64);
    assert_eq!(c["sizeof.vgpu_req_hdr"], REQ_HDR_SIZE as u64);
    for (f, n) in [
        ("version", &0x1101u16.to_le_bytes()[..]),
        ("opcode", &0x2202u16.to_le_bytes()[..]),
        ("flags", &0x3303_3303u32.to_le_bytes()[..]),
        ("tag", &0x4404_4404_4404_4404u64.to_le_bytes()[..]),
        ("payload_len", &0x5505_5505u32.to_le_bytes()[..]),
        ("reserved", &0x6606_6606u32.to_le_bytes()[..]),
    ] {
        assert_eq!(
            c[&format!("vgpu_req_hdr.{f}")],
            offset_in(&req, n),
            "req {f}"
        );
    }

    let resp = RespHdr {
        status: 0x1111_0001,
        output_len: 0x2222_0002,
        tag: 0x3333_0003_3333_0003,
        dispatch_seq: 0x4444_0004_4444_0004,
        queue_ns: 0x5555_0005_5555_0005,
        exec_ns: 0x6666_0006_6666_0006,
    };
    let rb = resp.encode();
    assert_eq!(c["sizeof.vgpu_resp_hdr"], RESP_HDR_SIZE as u64);
    for (f, n) in [
        ("status", resp.status.to_le_bytes().to_vec()),
        ("output_len", resp.output_len.to_le_bytes().to_vec()),
        ("tag", resp.tag.to_le_bytes().to_vec()),
        ("dispatch_seq", resp.dispatch_seq.to_le_bytes().to_vec()),
        ("queue_ns", resp.queue_ns.to_le_bytes().to_vec()),
        ("exec_ns", resp.exec_ns.to_le_bytes().to_vec()),
    ] {
        assert_eq!(
            c[&format!("vgpu_resp_hdr.{f}")],
            offset_in(&rb, &n),
            "resp {f}"
        );
    }

    assert_eq!(c["sizeof.virtio_vgpu_config"], CONFIG_SIZE as u64);
    for (f, off) in [
        ("magic", CFG_MAGIC),
        ("version", CFG_VERSION),
        ("pool_id", CFG_POOL_ID),
        ("priority", CFG_PRIORITY),
        ("vm_id", CFG_VM_ID),
        ("gpu_state", CFG_GPU_STATE),
        ("gpu_epoch", CFG_GPU_EPOCH),
    ] {
        assert_eq!(
            c[&format!("virtio_vgpu_config.{f}")],
            off as u64,
            "config {f}"
        );
    }

    let info = DeviceInfo {
        executor: ExecutorKind::Cuda,
        gpu_index: 0x0202_0202,
        memory_total: 0x0303_0303_0303_0303,
        compute_capability: 0x0404_0404,
        exec_limit_ms: 0x0505_0505,
        name: "\u{6}\u{6}\u{6}\u{6}".into(),
    }
    .encode();
    assert_eq!(c["sizeof.vgpu_info"], INFO_SIZE as u64);
    assert_eq!(c["vgpu_info.executor"], 0);
    for (f, n) in [
        ("gpu_index", vec![2u8; 4]),
        ("memory_total", vec![3u8; 8]),
        ("compute_capability", vec![4u8; 4]),
        ("exec_limit_ms", vec![5u8; 4]),
        ("name", vec![6u8; 4]),
    ] {
        assert_eq!(
            c[&format!("vgpu_info.{f}")],
            offset_in(&info, &n),
            "info {f}"
        );
    }

    assert_eq!(c["VIRTIO_ID_VGPU"], VIRTIO_ID_VGPU as u64);
    assert_eq!(c["VGPU_MAGIC"], MAGIC as u64);
    assert_eq!(c["VGPU_VERSION"], VERSION as u64);
    assert_eq!(c["VGPU_CONFIG_SIZE"], CONFIG_SIZE as u64);
    assert_eq!(c["VGPU_REQ_VERSION"], REQ_VERSION as u64);
    for (k, op) in [
        ("op.ping", Opcode::Ping),
        ("op.get_info", Opcode::GetInfo),
        ("op.busy_wait", Opcode::BusyWait),
        ("op.scalar_add", Opcode::ScalarAddI32),
        ("op.vector_add", Opcode::VectorAddF32),
    ] {
        assert_eq!(c[k], op as u64, "{k}");
    }
    for (k, s) in [
        ("s.ok", Status::Ok),
        ("s.bad_request", Status::BadRequest),
        ("s.unsupported", Status::Unsupported),
        ("s.too_large", Status::TooLarge),
        ("s.no_resources", Status::NoResources),
        ("s.device_error", Status::DeviceError),
        ("s.timeout", Status::Timeout),
        ("s.cancelled", Status::Cancelled),
        ("s.not_found", Status::NotFound),
        ("s.denied", Status::Denied),
    ] {
        assert_eq!(c[k], s as u64, "{k}");
    }
    for (k, p) in [
        ("prio.low", Priority::Low),
        ("prio.medium", Priority::Medium),
        ("prio.high", Priority::High),
    ] {
        assert_eq!(c[k], p as u64, "{k}");
    }
    assert_eq!(c["executor.cpu"], ExecutorKind::Cpu as u64);
    assert_eq!(c["executor.cuda"], ExecutorKind::Cuda as u64);
}

/// Every opcode and status the Rust contract defines has the same value
/// under its C name, and every wire struct has the C struct's size and field
/// offsets (generated from the Rust definitions, so a new opcode or field
/// cannot be forgotten here).
#[test]
fn every_opcode_status_and_struct_matches() {
    use std::mem::{offset_of, size_of};
    use vgpu::executor::remoting::{
        AllocWire, DtohWire, HandleWire, HtodWire, LaunchParamWire, LaunchWire,
    };

    let mut want: Vec<(String, String, u64)> = Vec::new();
    for &op in Opcode::ALL {
        want.push((op.c_name().into(), op.c_name().into(), op as u64));
    }
    for &st in Status::ALL {
        want.push((st.c_name().into(), st.c_name().into(), st as u64));
    }
    for &g in GpuState::ALL {
        want.push((g.c_name().into(), g.c_name().into(), g as u64));
    }
    macro_rules! layout {
        ($c:literal, $t:ty { $($f:ident),* }) => {{
            want.push((format!("sizeof.{}", $c), format!("sizeof(struct {})", $c), size_of::<$t>() as u64));
            $(want.push((
                format!("{}.{}", $c, stringify!($f)),
                format!("offsetof(struct {}, {})", $c, stringify!($f)),
                offset_of!($t, $f) as u64,
            ));)*
        }};
    }
    layout!(
        "virtio_vgpu_config",
        ConfigSpace {
            magic,
            version,
            pool_id,
            priority,
            vm_id,
            gpu_state,
            gpu_epoch,
            reserved
        }
    );
    layout!(
        "vgpu_req_hdr",
        ReqHdrWire {
            version,
            opcode,
            flags,
            tag,
            payload_len,
            reserved
        }
    );
    layout!(
        "vgpu_resp_hdr",
        RespHdrWire {
            status,
            output_len,
            tag,
            dispatch_seq,
            queue_ns,
            exec_ns
        }
    );
    layout!(
        "vgpu_info",
        InfoWire {
            executor,
            gpu_index,
            memory_total,
            compute_capability,
            exec_limit_ms,
            reserved,
            name
        }
    );
    layout!(
        "vgpu_launch",
        LaunchWire {
            module,
            grid,
            block,
            shared_mem_bytes,
            name_len,
            param_count,
            reserved
        }
    );
    layout!("vgpu_launch_param", LaunchParamWire { kind, size });
    {
        use vgpu::executor::cuda_api::{self as api, *};
        layout!("vgpu_cu_reply", ReplyWire { result, done });
        layout!(
            "vgpu_cu_device_info",
            DeviceInfoWire {
                api_version,
                attr_count,
                total_mem,
                uuid,
                name
            }
        );
        layout!("vgpu_cu_copy", CopyWire { dptr, len });
        layout!(
            "vgpu_cu_function",
            FunctionWire {
                function,
                param_count,
                param_bytes
            }
        );
        layout!("vgpu_cu_param", ParamWire { offset, size });
        layout!("vgpu_cu_global", GlobalWire { dptr, size });
        layout!(
            "vgpu_cu_func_attr",
            FuncAttrWire {
                function,
                attribute,
                reserved
            }
        );
        layout!(
            "vgpu_cu_occupancy",
            OccupancyWire {
                function,
                block_size,
                dynamic_smem
            }
        );
        layout!("vgpu_cu_create", CreateWire { flags, priority });
        layout!("vgpu_cu_event_pair", EventPairWire { start, end });
        layout!("vgpu_cu_mem_info", MemInfoWire { free, total });
        layout!(
            "vgpu_cu_cmdbuf",
            CommandBufferWire {
                record_count,
                reserved
            }
        );
        layout!(
            "vgpu_cu_record",
            RecordWire {
                kind,
                reserved,
                len,
                stream
            }
        );
        layout!(
            "vgpu_cu_launch",
            LaunchWire {
                function,
                grid,
                block,
                shared_mem,
                params_len
            }
        );
        layout!("vgpu_cu_dtod", DtodWire { dst, src, len });
        layout!(
            "vgpu_cu_memset",
            MemsetWire {
                dst,
                count,
                value,
                elem_size
            }
        );
        layout!(
            "vgpu_cu_gemm",
            GemmWire {
                a,
                b,
                c,
                op,
                math_mode,
                transa,
                transb,
                m,
                n,
                k,
                lda,
                ldb,
                ldc,
                a_type,
                b_type,
                c_type,
                compute_type,
                algo,
                alpha,
                beta,
                reserved
            }
        );
        for (c, v) in [
            ("VGPU_CU_API_VERSION", u64::from(api::API_VERSION)),
            ("VGPU_CU_MIN_API_VERSION", u64::from(api::MIN_API_VERSION)),
            ("VGPU_CU_BLAS_API_VERSION", u64::from(api::BLAS_API_VERSION)),
            ("VGPU_CU_REC_GEMM", u64::from(record::GEMM)),
            ("VGPU_CU_GEMM_SGEMM", u64::from(api::blas::SGEMM)),
            ("VGPU_CU_GEMM_EX", u64::from(api::blas::GEMM_EX)),
            ("VGPU_CU_ATTR_COUNT", api::ATTR_COUNT as u64),
            ("VGPU_CU_ALL_DONE", u64::from(api::ALL_DONE)),
            ("VGPU_CU_REC_LAUNCH", u64::from(record::LAUNCH)),
            ("VGPU_CU_REC_MEMCPY_HTOD", u64::from(record::MEMCPY_HTOD)),
            ("VGPU_CU_REC_MEMCPY_DTOH", u64::from(record::MEMCPY_DTOH)),
            ("VGPU_CU_REC_MEMCPY_DTOD", u64::from(record::MEMCPY_DTOD)),
            ("VGPU_CU_REC_MEMSET", u64::from(record::MEMSET)),
            ("VGPU_CU_REC_EVENT_RECORD", u64::from(record::EVENT_RECORD)),
            (
                "VGPU_CU_REC_STREAM_WAIT_EVENT",
                u64::from(record::STREAM_WAIT_EVENT),
            ),
        ] {
            want.push((c.into(), c.into(), v));
        }
    }
    layout!(
        "vgpu_submit",
        SubmitIoctl {
            opcode,
            reserved0,
            flags,
            tag,
            payload,
            payload_len,
            output_cap,
            output,
            timeout_ms,
            output_len,
            resp,
            reserved
        }
    );
    want.push((
        "VGPU_SGEMM_TF32".into(),
        "VGPU_SGEMM_TF32".into(),
        u64::from(vgpu::protocol::SGEMM_TF32),
    ));
    want.push((
        "VGPU_IOC_SUBMIT".into(),
        "VGPU_IOC_SUBMIT".into(),
        VGPU_IOC_SUBMIT as u64,
    ));
    // The remoting payloads without a C struct: the header documents them
    // as le64 fields.
    assert_eq!(size_of::<AllocWire>(), 8);
    assert_eq!(size_of::<HandleWire>(), 8);
    assert_eq!(size_of::<HtodWire>(), 16);
    assert_eq!(size_of::<DtohWire>(), 24);

    let mut program = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <sys/ioctl.h>\n#include \"uapi/vgpu.h\"\nint main(void) {\n",
    );
    for (key, expr, _) in &want {
        program.push_str(&format!(
            "    printf(\"%s %llu\\n\", \"{key}\", (unsigned long long)({expr}));\n"
        ));
    }
    program.push_str("    return 0;\n}\n");
    let c = compile_and_run(&program);
    assert_eq!(c.len(), want.len());
    for (key, _, value) in &want {
        assert_eq!(c.get(key), Some(value), "{key}");
    }
}
