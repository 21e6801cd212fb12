/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause) */
/*
 * vgpu device contract v1 (docs/protocol.md) and the guest character-device
 * interface. The one C definition of the request layout, shared by the guest
 * kernel module and the guest client; tests/uapi_header.rs checks it against
 * the Rust definition in src/protocol.rs.
 */
#ifndef _UAPI_LINUX_VGPU_H
#define _UAPI_LINUX_VGPU_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define VIRTIO_ID_VGPU		63

/* Config space (and vgpu-stub BAR0), 64 bytes, little-endian, read-only. */
#define VGPU_MAGIC		0x55504756u	/* "VGPU" */
#define VGPU_VERSION		0x00010000u
#define VGPU_CONFIG_SIZE	64

struct virtio_vgpu_config {
	__le32 magic;
	__le32 version;
	__le32 pool_id;		/* ASCII letter: 'A' = 0x41 */
	__le32 priority;	/* 0 low, 1 medium, 2 high */
	__le32 vm_id;
	__le32 gpu_state;	/* VGPU_GPU_*: health of the GPU serving the VM */
	__le32 gpu_epoch;	/* rebuilds of that GPU's executor after faults */
	__u8 reserved[36];
};

#define VGPU_PRIO_LOW		0
#define VGPU_PRIO_MEDIUM	1
#define VGPU_PRIO_HIGH		2

/*
 * gpu_state. The host changes it and sends a config-change notification.
 * Not OK: every request answers VGPU_S_DEVICE_ERROR. A new gpu_epoch: the
 * device state the guest held (remoting handles, device memory) is gone.
 */
#define VGPU_GPU_OK		0
#define VGPU_GPU_DEGRADED	1	/* reserved: nothing sends it yet */
#define VGPU_GPU_FAILED		2	/* lost; the host retries bringing it back */
#define VGPU_GPU_RECOVERING	3	/* its executor is being rebuilt */

/* Request: device-readable header + payload, then device-writable response
 * header + output, in one descriptor chain, split any way. */
#define VGPU_REQ_VERSION	1

struct vgpu_req_hdr {
	__le16 version;
	__le16 opcode;
	__le32 flags;		/* 0 */
	__le64 tag;		/* echoed in the response */
	__le32 payload_len;
	__le32 reserved;
};

struct vgpu_resp_hdr {
	__le32 status;
	__le32 output_len;
	__le64 tag;
	__le64 dispatch_seq;	/* per-GPU dispatch order, 0 if never dispatched */
	__le64 queue_ns;	/* taken off the ring -> dispatch */
	__le64 exec_ns;		/* execution time */
};

/* Opcodes */
#define VGPU_OP_PING		0x0001
#define VGPU_OP_GET_INFO	0x0002
#define VGPU_OP_BUSY_WAIT	0x0003	/* payload: le64 ns */
#define VGPU_OP_SCALAR_ADD_I32	0x0100	/* payload: le32 a, le32 b; out: le32 */
#define VGPU_OP_VECTOR_ADD_F32	0x0101	/* payload: le32 n, le32 0, f32 a[n], f32 b[n] */
#define VGPU_OP_SAXPY_F32	0x0102	/* payload: le32 n, f32 a, f32 x[n], f32 y[n]; out: f32 a*x+y [n] */
#define VGPU_OP_SGEMM_F32	0x0103	/* payload: le32 m, n, k, f32 A[m*k], f32 B[k*n] (row-major); out: f32 C[m*n] */
/* SGEMM_F32: OR this into the m word to ask for TF32 tensor-core math
 * (inputs rounded to a 10-bit mantissa, FP32 accumulation); without it the
 * result is full FP32. The other 31 bits of the word are m. */
#define VGPU_SGEMM_TF32		0x80000000u

/* CUDA remoting (docs/protocol.md, "CUDA remoting"): handles are per VM, le64. */
#define VGPU_OP_MEM_ALLOC	0x0201	/* payload: le64 size; out: le64 handle */
#define VGPU_OP_MEM_FREE	0x0202	/* payload: le64 handle */
#define VGPU_OP_MEMCPY_HTOD	0x0203	/* payload: le64 handle, le64 offset, bytes */
#define VGPU_OP_MEMCPY_DTOH	0x0204	/* payload: le64 handle, le64 offset, le64 len; out: bytes */
#define VGPU_OP_MODULE_LOAD	0x0205	/* payload: PTX text; out: le64 module handle */
#define VGPU_OP_MODULE_UNLOAD	0x0206	/* payload: le64 module handle */
#define VGPU_OP_LAUNCH		0x0207	/* payload: struct vgpu_launch, name, params */
#define VGPU_OP_SYNCHRONIZE	0x0208	/* nothing in, nothing out */

/* LAUNCH payload: this header, then name_len bytes of kernel name (no NUL),
 * then param_count parameters, each a struct vgpu_launch_param followed by
 * `size` bytes of value, packed without padding. */
struct vgpu_launch {
	__le64 module;
	__le32 grid[3];
	__le32 block[3];
	__le32 shared_mem_bytes;
	__le32 name_len;	/* 1..256 */
	__le32 param_count;	/* 0..64, must match the kernel */
	__le32 reserved;	/* 0 */
};					/* 48 bytes */

#define VGPU_PARAM_BUFFER	0	/* size 8: le64 buffer handle -> its device address */
#define VGPU_PARAM_BYTES	1	/* size bytes passed as they are */

struct vgpu_launch_param {
	__le32 kind;
	__le32 size;		/* must equal the kernel's parameter size */
};

/* CUDA API (docs/protocol.md, "CUDA API"): raw device pointers of the VM's
 * own worker context, modules from whole images, streams, events and
 * command buffers. Every output starts with struct vgpu_cu_reply. */
#define VGPU_OP_CU_DEVICE_INFO		0x0300	/* out: reply, vgpu_cu_device_info, le32 attrs[] */
#define VGPU_OP_CU_MEM_ALLOC		0x0301	/* payload: le64 size; out: reply, le64 dptr */
#define VGPU_OP_CU_MEM_FREE		0x0302	/* payload: le64 dptr */
#define VGPU_OP_CU_MEMCPY_HTOD		0x0303	/* payload: le64 dptr, bytes */
#define VGPU_OP_CU_MEMCPY_DTOH		0x0304	/* payload: vgpu_cu_copy; out: reply, bytes */
#define VGPU_OP_CU_MODULE_LOAD		0x0305	/* payload: fatbin/cubin/PTX image; out: reply, le64 module */
#define VGPU_OP_CU_MODULE_UNLOAD	0x0306	/* payload: le64 module */
#define VGPU_OP_CU_GET_FUNCTION		0x0307	/* payload: le64 module, name; out: reply, vgpu_cu_function, params */
#define VGPU_OP_CU_GET_GLOBAL		0x0308	/* payload: le64 module, name; out: reply, vgpu_cu_global */
#define VGPU_OP_CU_FUNC_ATTRIBUTE	0x0309	/* payload: vgpu_cu_func_attr; out: reply, le32 value */
#define VGPU_OP_CU_OCCUPANCY		0x030A	/* payload: vgpu_cu_occupancy; out: reply, le32 blocks */
#define VGPU_OP_CU_STREAM_CREATE	0x030B	/* payload: vgpu_cu_create; out: reply, le64 stream */
#define VGPU_OP_CU_STREAM_DESTROY	0x030C	/* payload: le64 stream */
#define VGPU_OP_CU_EVENT_CREATE		0x030D	/* payload: vgpu_cu_create; out: reply, le64 event */
#define VGPU_OP_CU_EVENT_DESTROY	0x030E	/* payload: le64 event */
#define VGPU_OP_CU_EVENT_ELAPSED	0x030F	/* payload: vgpu_cu_event_pair; out: reply, f32 ms */
#define VGPU_OP_CU_MEM_INFO		0x0310	/* out: reply, vgpu_cu_mem_info */
#define VGPU_OP_CU_COMMAND_BUFFER	0x0311	/* payload: vgpu_cu_cmdbuf, records; out: reply, DtoH bytes */
/* API version 2: cuBLAS. */
#define VGPU_OP_CU_BLAS_INIT		0x0312	/* creates the VM's cuBLAS handle; out: reply, le32 cuBLAS version */

#define VGPU_CU_API_VERSION	2	/* 1: driver and runtime; 2: + cuBLAS */
#define VGPU_CU_MIN_API_VERSION	1
#define VGPU_CU_BLAS_API_VERSION	2
#define VGPU_CU_ATTR_COUNT	192
#define VGPU_CU_ALL_DONE	0xFFFFFFFFu

struct vgpu_cu_reply {
	__le32 result;		/* CUresult */
	__le32 done;		/* command buffer: records done before the failing one, or VGPU_CU_ALL_DONE */
};

struct vgpu_cu_device_info {
	__le32 api_version;
	__le32 attr_count;	/* le32 attrs[attr_count] follow: cuDeviceGetAttribute(i) */
	__le64 total_mem;
	__u8 uuid[16];
	char name[256];
};

struct vgpu_cu_copy {
	__le64 dptr;
	__le64 len;
};

struct vgpu_cu_function {
	__le64 function;
	__le32 param_count;	/* struct vgpu_cu_param[param_count] follow */
	__le32 param_bytes;	/* size of the packed parameter buffer of a launch */
};

struct vgpu_cu_param {
	__le32 offset;
	__le32 size;
};

struct vgpu_cu_global {
	__le64 dptr;
	__le64 size;
};

struct vgpu_cu_func_attr {
	__le64 function;
	__le32 attribute;	/* CUfunction_attribute */
	__le32 reserved;
};

struct vgpu_cu_occupancy {
	__le64 function;
	__le32 block_size;
	__le32 dynamic_smem;
};

struct vgpu_cu_create {
	__le32 flags;
	__le32 priority;	/* streams only; 0 for events */
};

struct vgpu_cu_event_pair {
	__le64 start;
	__le64 end;
};

struct vgpu_cu_mem_info {
	__le64 free;
	__le64 total;
};

/* Command buffer: this header, then record_count records, each a
 * struct vgpu_cu_record followed by len bytes of body. */
struct vgpu_cu_cmdbuf {
	__le32 record_count;	/* <= 65536 */
	__le32 reserved;
};

#define VGPU_CU_REC_LAUNCH		1	/* body: vgpu_cu_launch, packed params */
#define VGPU_CU_REC_MEMCPY_HTOD		2	/* body: le64 dst, bytes */
#define VGPU_CU_REC_MEMCPY_DTOH		3	/* body: vgpu_cu_copy; bytes appended to the output */
#define VGPU_CU_REC_MEMCPY_DTOD		4	/* body: vgpu_cu_dtod */
#define VGPU_CU_REC_MEMSET		5	/* body: vgpu_cu_memset */
#define VGPU_CU_REC_EVENT_RECORD	6	/* body: le64 event */
#define VGPU_CU_REC_STREAM_WAIT_EVENT	7	/* body: le64 event */
#define VGPU_CU_REC_GEMM		8	/* body: vgpu_cu_gemm (API version 2) */

struct vgpu_cu_record {
	__le16 kind;
	__le16 reserved;
	__le32 len;		/* body bytes */
	__le64 stream;		/* 0: the default stream */
};

struct vgpu_cu_launch {
	__le64 function;
	__le32 grid[3];
	__le32 block[3];
	__le32 shared_mem;
	__le32 params_len;	/* must equal the function's param_bytes */
};

struct vgpu_cu_dtod {
	__le64 dst;
	__le64 src;
	__le64 len;
};

struct vgpu_cu_memset {
	__le64 dst;
	__le64 count;		/* elements */
	__le32 value;
	__le32 elem_size;	/* 1, 2 or 4 */
};

/* GEMM record: C = alpha op(A) op(B) + beta C, column-major, with cuBLAS's
 * own values (cublasOperation_t, cudaDataType, cublasComputeType_t,
 * cublasMath_t, cublasGemmAlgo_t). */
#define VGPU_CU_GEMM_SGEMM		1	/* cublasSgemm_v2 */
#define VGPU_CU_GEMM_EX			2	/* cublasGemmEx */

struct vgpu_cu_gemm {
	__le64 a;
	__le64 b;
	__le64 c;
	__le32 op;		/* VGPU_CU_GEMM_* */
	__le32 math_mode;	/* the handle's cublasMath_t */
	__le32 transa;
	__le32 transb;
	__le32 m;		/* signed, >= 0 */
	__le32 n;
	__le32 k;
	__le32 lda;
	__le32 ldb;
	__le32 ldc;
	__le32 a_type;		/* CUDA_R_32F (0) */
	__le32 b_type;
	__le32 c_type;
	__le32 compute_type;	/* SGEMM: CUBLAS_COMPUTE_32F (68) */
	__le32 algo;		/* signed; SGEMM: CUBLAS_GEMM_DEFAULT (-1) */
	__le32 alpha;		/* f32 bits */
	__le32 beta;		/* f32 bits */
	__le32 reserved;
};

/* Status codes */
#define VGPU_S_OK		0
#define VGPU_S_BAD_REQUEST	1
#define VGPU_S_UNSUPPORTED	2
#define VGPU_S_TOO_LARGE	3
#define VGPU_S_NO_RESOURCES	4
#define VGPU_S_DEVICE_ERROR	5
#define VGPU_S_TIMEOUT		6
#define VGPU_S_CANCELLED	7
#define VGPU_S_NOT_FOUND	8
#define VGPU_S_DENIED		9

/* GET_INFO output, 96 bytes */
#define VGPU_EXECUTOR_CPU	0
#define VGPU_EXECUTOR_CUDA	1

struct vgpu_info {
	__le32 executor;
	__le32 gpu_index;
	__le64 memory_total;	/* bytes */
	__le32 compute_capability; /* major << 16 | minor, 0 on CPU */
	__le32 exec_limit_ms;
	__u8 reserved[8];
	char name[64];		/* NUL-terminated */
};

/*
 * Guest character device /dev/vgpuN (virtio_vgpu.ko).
 *
 * VGPU_IOC_SUBMIT sends one request and waits for its response. The driver
 * copies the payload into kernel bounce buffers, builds one descriptor chain
 * (vgpu_req_hdr + payload readable, vgpu_resp_hdr + output writable), and
 * blocks until the device returns the chain, the timeout expires or a signal
 * arrives. Every pointer is a user virtual address carried in a __u64, so the
 * layout is the same for 32- and 64-bit callers.
 *
 * Return value: 0 when the device answered (the device's own status is in
 * resp.status, which may still be an error), or -1 with errno:
 *   EINVAL   a reserved field is non-zero
 *   E2BIG    payload_len or output_cap above VGPU_MAX_PAYLOAD / VGPU_MAX_OUTPUT
 *   EFAULT   a user pointer is bad
 *   ENOMEM   no memory for the bounce buffers
 *   ETIMEDOUT no response within timeout_ms
 *   EINTR    interrupted by a signal (the request may still run on the device)
 *   ENODEV   the device was removed or reset
 *   EIO      the device returned a malformed response (shorter than the
 *            response header) or the virtqueue is broken
 */
#define VGPU_MAX_PAYLOAD	(256u << 20)
#define VGPU_MAX_OUTPUT		(256u << 20)
#define VGPU_DEFAULT_TIMEOUT_MS	30000u
#define VGPU_MAX_TIMEOUT_MS	600000u

struct vgpu_submit {
	__u16 opcode;		/* in: VGPU_OP_* */
	__u16 reserved0;	/* in: 0 */
	__u32 flags;		/* in: copied to vgpu_req_hdr.flags, 0 in v1 */
	__u64 tag;		/* in: copied to vgpu_req_hdr.tag, echoed */
	__u64 payload;		/* in: user pointer to payload_len bytes */
	__u32 payload_len;	/* in */
	__u32 output_cap;	/* in: bytes available at output */
	__u64 output;		/* in: user pointer, receives the output */
	__u32 timeout_ms;	/* in: 0 = VGPU_DEFAULT_TIMEOUT_MS */
	__u32 output_len;	/* out: bytes written to output */
	struct vgpu_resp_hdr resp; /* out: as the device wrote it (little-endian) */
	__u64 reserved[4];	/* in: 0 */
};

#define VGPU_IOC_MAGIC		0xF7
#define VGPU_IOC_SUBMIT		_IOWR(VGPU_IOC_MAGIC, 0x01, struct vgpu_submit)

#endif /* _UAPI_LINUX_VGPU_H */
