// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_vgpu - guest driver for the vgpu virtio device (device ID 63).
 *
 * The device runs GPU work for the guest on the host. Each request is one
 * descriptor chain on virtqueue 0: request header and payload readable by the
 * device, response header and output writable by it. User space submits
 * requests through /dev/vgpuN (VGPU_IOC_SUBMIT); the host-assigned pool,
 * priority and VM id from config space are shown in sysfs, one value per
 * attribute, and so are the health and recovery epoch of the host GPU that
 * serves the VM (gpu_state, gpu_state_name, gpu_epoch). Driver counters are in debugfs (virtio_vgpu/vgpuN/stats).
 *
 * The contract (layouts, opcodes, status codes) lives in the uapi header,
 * include/uapi/vgpu.h.
 */

#include <linux/cache.h>
#include <linux/completion.h>
#include <linux/ctype.h>
#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/idr.h>
#include <linux/jiffies.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/scatterlist.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include <uapi/vgpu.h>

#define VGPU_NAME_LEN		16

/* Bounce buffers are built from chunks of at most this order (2 MiB on x86). */
#define VGPU_CHUNK_MAX_ORDER	9

/* The defined part of struct virtio_vgpu_config, in CPU byte order. */
struct vgpu_cfg {
	u32 magic;
	u32 version;
	u32 pool_id;
	u32 priority;
	u32 vm_id;
	u32 gpu_state;
	u32 gpu_epoch;
};

struct vgpu {
	struct virtio_device *vdev;
	struct virtqueue *vq;
	struct miscdevice misc;
	char name[VGPU_NAME_LEN];
	int index;
	struct kref ref;		/* device + one per open file */

	/*
	 * Protects vq (add, kick, get_buf, detach) and @dead. Taken from the
	 * virtqueue callback, hence irq-safe.
	 */
	spinlock_t lock;
	bool dead;			/* removed: no new submissions */
	unsigned long space_gen;	/* bumped whenever buffers come back */
	wait_queue_head_t space_wq;	/* submitters waiting for ring space */

	/* Counters for debugfs virtio_vgpu/vgpuN/stats, under @lock. */
	u64 n_submitted;
	u64 n_completed;
	u64 n_abandoned;		/* timed out or interrupted waits */
	u64 n_ring_full;		/* times a submitter waited for space */

	struct mutex cfg_lock;		/* protects cfg */
	struct vgpu_cfg cfg;
	struct work_struct config_work;

	struct dentry *debugfs;		/* virtio_vgpu/vgpuN */
};

/* A bounce buffer: a scatterlist over page chunks. */
struct vgpu_buf {
	struct scatterlist *sgl;
	unsigned int nents;
	size_t len;
};

enum vgpu_req_state {
	VGPU_REQ_NEW,
	VGPU_REQ_QUEUED,	/* the device owns the buffers */
	VGPU_REQ_DONE,		/* returned by the device, or detached */
};

struct vgpu_request {
	struct completion done;
	struct list_head free_node;
	enum vgpu_req_state state;	/* under vgpu->lock */
	bool abandoned;			/* waiter gone; free on return */
	int error;			/* -ENODEV when detached on remove */
	unsigned int used_len;
	struct vgpu_buf payload;
	struct vgpu_buf output;
	struct vgpu_req_hdr hdr;
	/* Device-writable: keep it off the cache line the device reads. */
	struct vgpu_resp_hdr resp ____cacheline_aligned;
};

static DEFINE_IDA(vgpu_ida);
static struct dentry *vgpu_debugfs_root;	/* virtio_vgpu/ */

static const char *vgpu_gpu_state_name(u32 state)
{
	switch (state) {
	case VGPU_GPU_OK:
		return "ok";
	case VGPU_GPU_DEGRADED:
		return "degraded";
	case VGPU_GPU_FAILED:
		return "failed";
	case VGPU_GPU_RECOVERING:
		return "recovering";
	default:
		return "unknown";
	}
}

static const char *vgpu_prio_name(u32 prio)
{
	switch (prio) {
	case VGPU_PRIO_LOW:
		return "low";
	case VGPU_PRIO_MEDIUM:
		return "medium";
	case VGPU_PRIO_HIGH:
		return "high";
	default:
		return "unknown";
	}
}

static void vgpu_buf_free(struct vgpu_buf *buf)
{
	struct scatterlist *sg;
	unsigned int i;

	if (!buf->sgl)
		return;
	for_each_sg(buf->sgl, sg, buf->nents, i)
		__free_pages(sg_page(sg), get_order(sg->length));
	kfree(buf->sgl);
	buf->sgl = NULL;
	buf->nents = 0;
}

/*
 * Allocate @len bytes as physically contiguous chunks, largest first, so that
 * a big payload needs few descriptors; fall back to smaller chunks when
 * memory is fragmented. At most @max_nents chunks.
 */
static int vgpu_buf_alloc(struct vgpu_buf *buf, size_t len,
			  unsigned int max_nents, gfp_t extra)
{
	unsigned int order = VGPU_CHUNK_MAX_ORDER;
	unsigned int n = 0;
	size_t left = len;

	buf->len = len;
	buf->nents = 0;
	buf->sgl = NULL;
	if (!len)
		return 0;
	if (!max_nents)
		return -ENOMEM;

	buf->sgl = kcalloc(max_nents, sizeof(*buf->sgl), GFP_KERNEL);
	if (!buf->sgl)
		return -ENOMEM;
	sg_init_table(buf->sgl, max_nents);

	while (left) {
		size_t chunk;
		struct page *page;
		gfp_t gfp = GFP_KERNEL | extra;

		order = min_t(unsigned int, order, get_order(left));
		if (order)
			gfp |= __GFP_NOWARN | __GFP_NORETRY;
		page = alloc_pages(gfp, order);
		if (!page) {
			if (!order)
				goto fail;
			order--;
			continue;
		}
		if (n == max_nents) {
			__free_pages(page, order);
			goto fail;
		}
		chunk = min_t(size_t, left, PAGE_SIZE << order);
		sg_set_page(&buf->sgl[n], page, chunk, 0);
		n++;
		buf->nents = n;
		left -= chunk;
	}
	sg_mark_end(&buf->sgl[n - 1]);
	return 0;

fail:
	/* sg->length is the used length; the order is recomputed from it. */
	vgpu_buf_free(buf);
	return -ENOMEM;
}

static int vgpu_buf_from_user(struct vgpu_buf *buf, const void __user *src)
{
	struct scatterlist *sg;
	unsigned int i;

	for_each_sg(buf->sgl, sg, buf->nents, i) {
		if (copy_from_user(sg_virt(sg), src, sg->length))
			return -EFAULT;
		src += sg->length;
	}
	return 0;
}

static int vgpu_buf_to_user(struct vgpu_buf *buf, void __user *dst, size_t len)
{
	struct scatterlist *sg;
	unsigned int i;

	for_each_sg(buf->sgl, sg, buf->nents, i) {
		size_t n = min_t(size_t, len, sg->length);

		if (!n)
			break;
		if (copy_to_user(dst, sg_virt(sg), n))
			return -EFAULT;
		dst += n;
		len -= n;
	}
	return 0;
}

static void vgpu_req_free(struct vgpu_request *req)
{
	vgpu_buf_free(&req->payload);
	vgpu_buf_free(&req->output);
	kfree(req);
}

static void vgpu_release(struct kref *ref)
{
	kfree(container_of(ref, struct vgpu, ref));
}

/* Called with vgpu->lock held: hand a returned request back to its owner. */
static void vgpu_req_finish(struct vgpu_request *req, unsigned int len,
			    int error, struct list_head *to_free)
{
	req->used_len = len;
	req->error = error;
	req->state = VGPU_REQ_DONE;
	if (req->abandoned)
		list_add_tail(&req->free_node, to_free);
	else
		complete(&req->done);
}

static void vgpu_free_list(struct list_head *to_free)
{
	struct vgpu_request *req, *tmp;

	list_for_each_entry_safe(req, tmp, to_free, free_node) {
		list_del(&req->free_node);
		vgpu_req_free(req);
	}
}

static void vgpu_vq_done(struct virtqueue *vq)
{
	struct vgpu *vgpu = vq->vdev->priv;
	struct vgpu_request *req;
	unsigned long flags;
	unsigned int len;
	LIST_HEAD(to_free);

	spin_lock_irqsave(&vgpu->lock, flags);
	do {
		virtqueue_disable_cb(vq);
		while ((req = virtqueue_get_buf(vq, &len))) {
			vgpu->n_completed++;
			vgpu_req_finish(req, len, 0, &to_free);
		}
		if (unlikely(virtqueue_is_broken(vq)))
			break;
	} while (!virtqueue_enable_cb(vq));
	vgpu->space_gen++;
	spin_unlock_irqrestore(&vgpu->lock, flags);

	wake_up_all(&vgpu->space_wq);
	vgpu_free_list(&to_free);
}

/*
 * Queue @req on the ring and kick. When the ring is full, wait for the device
 * to return buffers instead of failing, within the caller's time budget.
 */
static int vgpu_queue_req(struct vgpu *vgpu, struct vgpu_request *req,
			  long *timeout)
{
	struct scatterlist hdr_sg, resp_sg, *sgs[4];
	unsigned int out = 0, in = 0;
	unsigned long gen;
	long ret;
	int err;

	sg_init_one(&hdr_sg, &req->hdr, sizeof(req->hdr));
	sgs[out++] = &hdr_sg;
	if (req->payload.nents)
		sgs[out++] = req->payload.sgl;
	sg_init_one(&resp_sg, &req->resp, sizeof(req->resp));
	sgs[out + in++] = &resp_sg;
	if (req->output.nents)
		sgs[out + in++] = req->output.sgl;

	for (;;) {
		spin_lock_irq(&vgpu->lock);
		if (vgpu->dead) {
			err = -ENODEV;
		} else {
			/*
			 * GFP_ATOMIC: under the lock the callback also takes.
			 * If the indirect table cannot be allocated, virtio_ring
			 * falls back to direct descriptors.
			 */
			err = virtqueue_add_sgs(vgpu->vq, sgs, out, in, req,
						GFP_ATOMIC);
			if (!err) {
				req->state = VGPU_REQ_QUEUED;
				vgpu->n_submitted++;
				/* Under the lock: remove may delete the vq. */
				virtqueue_kick(vgpu->vq);
			} else if (err == -ENOSPC &&
				   vgpu->vq->num_free ==
				   virtqueue_get_vring_size(vgpu->vq)) {
				/* Does not fit even in an empty ring. */
				err = -ENOMEM;
			}
		}
		if (err == -ENOSPC)
			vgpu->n_ring_full++;
		gen = vgpu->space_gen;
		spin_unlock_irq(&vgpu->lock);

		if (err != -ENOSPC)
			return err;

		ret = wait_event_interruptible_timeout(vgpu->space_wq,
				READ_ONCE(vgpu->space_gen) != gen ||
				READ_ONCE(vgpu->dead), *timeout);
		/* Nothing was queued yet, so the call can simply restart. */
		if (ret < 0)
			return -ERESTARTSYS;
		if (!ret)
			return -ETIMEDOUT;
		*timeout = ret;
	}
}

static long vgpu_submit(struct vgpu *vgpu, struct vgpu_submit __user *uarg)
{
	struct vgpu_submit arg;
	struct vgpu_request *req;
	unsigned int max_nents, i;
	size_t out_len;
	long timeout, ret;
	int err;

	if (copy_from_user(&arg, uarg, sizeof(arg)))
		return -EFAULT;
	if (arg.reserved0)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(arg.reserved); i++)
		if (arg.reserved[i])
			return -EINVAL;
	if (arg.payload_len > VGPU_MAX_PAYLOAD ||
	    arg.output_cap > VGPU_MAX_OUTPUT)
		return -E2BIG;
	if (arg.timeout_ms > VGPU_MAX_TIMEOUT_MS)
		return -EINVAL;
	timeout = msecs_to_jiffies(arg.timeout_ms ?: VGPU_DEFAULT_TIMEOUT_MS);

	req = kzalloc(sizeof(*req), GFP_KERNEL);
	if (!req)
		return -ENOMEM;
	init_completion(&req->done);
	INIT_LIST_HEAD(&req->free_node);

	/*
	 * A chain may not be longer than the ring (virtio spec 2.7.5.3.1):
	 * two descriptors for the headers, the rest split between the data
	 * buffers. The ring size cannot change while the vq exists, and the
	 * vq exists while the file is open unless the device is gone.
	 */
	spin_lock_irq(&vgpu->lock);
	max_nents = vgpu->dead ? 0 : virtqueue_get_vring_size(vgpu->vq);
	spin_unlock_irq(&vgpu->lock);
	if (!max_nents) {
		err = -ENODEV;
		goto out_free;
	}
	max_nents = max_nents > 2 ? max_nents - 2 : 0;
	if (arg.payload_len && arg.output_cap)
		max_nents /= 2;

	err = vgpu_buf_alloc(&req->payload, arg.payload_len, max_nents, 0);
	if (err)
		goto out_free;
	/* Zeroed so that a device that lies about output_len leaks nothing. */
	err = vgpu_buf_alloc(&req->output, arg.output_cap, max_nents,
			     __GFP_ZERO);
	if (err)
		goto out_free;
	err = vgpu_buf_from_user(&req->payload, u64_to_user_ptr(arg.payload));
	if (err)
		goto out_free;

	req->hdr.version = cpu_to_le16(VGPU_REQ_VERSION);
	req->hdr.opcode = cpu_to_le16(arg.opcode);
	req->hdr.flags = cpu_to_le32(arg.flags);
	req->hdr.tag = cpu_to_le64(arg.tag);
	req->hdr.payload_len = cpu_to_le32(arg.payload_len);

	err = vgpu_queue_req(vgpu, req, &timeout);
	if (err)
		goto out_free;

	ret = wait_for_completion_interruptible_timeout(&req->done, timeout);
	if (ret <= 0) {
		spin_lock_irq(&vgpu->lock);
		if (req->state != VGPU_REQ_DONE) {
			/*
			 * The device still owns the buffers: leave them to
			 * the callback (or to remove) to free.
			 */
			req->abandoned = true;
			vgpu->n_abandoned++;
			spin_unlock_irq(&vgpu->lock);
			return ret ? -EINTR : -ETIMEDOUT;
		}
		spin_unlock_irq(&vgpu->lock);
		/* Completed while we were giving up: use the result. */
	}

	if (req->error) {
		err = req->error;
		goto out_free;
	}
	if (req->used_len < sizeof(req->resp)) {
		/* Not dev_warn: vdev may be gone once the request is done. */
		pr_warn_ratelimited("%s: short response: %u bytes\n",
				    vgpu->name, req->used_len);
		err = -EIO;
		goto out_free;
	}

	out_len = min3((size_t)le32_to_cpu(req->resp.output_len),
		       (size_t)req->used_len - sizeof(req->resp),
		       (size_t)arg.output_cap);
	err = vgpu_buf_to_user(&req->output, u64_to_user_ptr(arg.output),
			       out_len);
	if (err)
		goto out_free;

	arg.output_len = out_len;
	arg.resp = req->resp;
	if (copy_to_user(uarg, &arg, sizeof(arg)))
		err = -EFAULT;

out_free:
	vgpu_req_free(req);
	return err;
}

static int vgpu_open(struct inode *inode, struct file *file)
{
	/* misc_open set private_data; it holds misc_mtx, so remove waits. */
	struct vgpu *vgpu = container_of(file->private_data, struct vgpu, misc);

	kref_get(&vgpu->ref);
	file->private_data = vgpu;
	return nonseekable_open(inode, file);
}

static int vgpu_release_file(struct inode *inode, struct file *file)
{
	struct vgpu *vgpu = file->private_data;

	kref_put(&vgpu->ref, vgpu_release);
	return 0;
}

static long vgpu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct vgpu *vgpu = file->private_data;

	switch (cmd) {
	case VGPU_IOC_SUBMIT:
		return vgpu_submit(vgpu, (struct vgpu_submit __user *)arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations vgpu_fops = {
	.owner		= THIS_MODULE,
	.open		= vgpu_open,
	.release	= vgpu_release_file,
	.unlocked_ioctl	= vgpu_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
};

/* sysfs: /sys/class/misc/vgpuN/{pool_id,priority,priority_name,vm_id,version} */

static struct vgpu *dev_to_vgpu(struct device *dev)
{
	struct miscdevice *misc = dev_get_drvdata(dev);

	return container_of(misc, struct vgpu, misc);
}

static ssize_t pool_id_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct vgpu *vgpu = dev_to_vgpu(dev);
	u32 pool;

	mutex_lock(&vgpu->cfg_lock);
	pool = vgpu->cfg.pool_id;
	mutex_unlock(&vgpu->cfg_lock);
	if (pool < 0x80 && isgraph(pool))
		return sysfs_emit(buf, "%c\n", (char)pool);
	return sysfs_emit(buf, "0x%x\n", pool);
}
static DEVICE_ATTR_RO(pool_id);

static ssize_t priority_show(struct device *dev, struct device_attribute *attr,
			     char *buf)
{
	struct vgpu *vgpu = dev_to_vgpu(dev);
	u32 prio;

	mutex_lock(&vgpu->cfg_lock);
	prio = vgpu->cfg.priority;
	mutex_unlock(&vgpu->cfg_lock);
	return sysfs_emit(buf, "%u\n", prio);
}
static DEVICE_ATTR_RO(priority);

static ssize_t priority_name_show(struct device *dev,
				  struct device_attribute *attr, char *buf)
{
	struct vgpu *vgpu = dev_to_vgpu(dev);
	u32 prio;

	mutex_lock(&vgpu->cfg_lock);
	prio = vgpu->cfg.priority;
	mutex_unlock(&vgpu->cfg_lock);
	return sysfs_emit(buf, "%s\n", vgpu_prio_name(prio));
}
static DEVICE_ATTR_RO(priority_name);

static ssize_t vm_id_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	struct vgpu *vgpu = dev_to_vgpu(dev);
	u32 vm_id;

	mutex_lock(&vgpu->cfg_lock);
	vm_id = vgpu->cfg.vm_id;
	mutex_unlock(&vgpu->cfg_lock);
	return sysfs_emit(buf, "%u\n", vm_id);
}
static DEVICE_ATTR_RO(vm_id);

static ssize_t version_show(struct device *dev, struct device_attribute *attr,
			    char *buf)
{
	struct vgpu *vgpu = dev_to_vgpu(dev);
	u32 version;

	mutex_lock(&vgpu->cfg_lock);
	version = vgpu->cfg.version;
	mutex_unlock(&vgpu->cfg_lock);
	return sysfs_emit(buf, "0x%08x\n", version);
}
static DEVICE_ATTR_RO(version);

static void vgpu_read_config(struct virtio_device *vdev, struct vgpu_cfg *cfg);

/*
 * The GPU's health changes without the guest doing anything; a host without
 * the backend channel sends no config-change interrupt, so these read
 * config space afresh instead of the copy the other attributes show.
 */
static ssize_t gpu_state_show(struct device *dev, struct device_attribute *attr,
			      char *buf)
{
	struct vgpu_cfg cfg;

	vgpu_read_config(dev_to_vgpu(dev)->vdev, &cfg);
	return sysfs_emit(buf, "%u\n", cfg.gpu_state);
}
static DEVICE_ATTR_RO(gpu_state);

static ssize_t gpu_state_name_show(struct device *dev,
				   struct device_attribute *attr, char *buf)
{
	struct vgpu_cfg cfg;

	vgpu_read_config(dev_to_vgpu(dev)->vdev, &cfg);
	return sysfs_emit(buf, "%s\n", vgpu_gpu_state_name(cfg.gpu_state));
}
static DEVICE_ATTR_RO(gpu_state_name);

static ssize_t gpu_epoch_show(struct device *dev, struct device_attribute *attr,
			      char *buf)
{
	struct vgpu_cfg cfg;

	vgpu_read_config(dev_to_vgpu(dev)->vdev, &cfg);
	return sysfs_emit(buf, "%u\n", cfg.gpu_epoch);
}
static DEVICE_ATTR_RO(gpu_epoch);

static struct attribute *vgpu_attrs[] = {
	&dev_attr_pool_id.attr,
	&dev_attr_priority.attr,
	&dev_attr_priority_name.attr,
	&dev_attr_vm_id.attr,
	&dev_attr_version.attr,
	&dev_attr_gpu_state.attr,
	&dev_attr_gpu_state_name.attr,
	&dev_attr_gpu_epoch.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vgpu);

/*
 * debugfs: virtio_vgpu/vgpuN/stats, the driver's counters on one line:
 * chains queued, chains the device returned, waits given up (timeout or
 * signal), and times a submitter waited for ring space.
 */
static int vgpu_stats_show(struct seq_file *m, void *unused)
{
	struct vgpu *vgpu = m->private;
	u64 sub, done, aband, full;

	spin_lock_irq(&vgpu->lock);
	sub = vgpu->n_submitted;
	done = vgpu->n_completed;
	aband = vgpu->n_abandoned;
	full = vgpu->n_ring_full;
	spin_unlock_irq(&vgpu->lock);
	seq_printf(m,
		   "submitted=%llu completed=%llu abandoned=%llu ring_full_waits=%llu\n",
		   sub, done, aband, full);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vgpu_stats);

/*
 * Read config space in one go. virtio_cread_bytes() repeats the read until
 * the config generation is stable, so the fields are one consistent snapshot
 * even while the host changes them.
 */
static void vgpu_read_config(struct virtio_device *vdev, struct vgpu_cfg *cfg)
{
	struct virtio_vgpu_config raw;

	virtio_cread_bytes(vdev, 0, &raw, sizeof(raw));
	cfg->magic = le32_to_cpu(raw.magic);
	cfg->version = le32_to_cpu(raw.version);
	cfg->pool_id = le32_to_cpu(raw.pool_id);
	cfg->priority = le32_to_cpu(raw.priority);
	cfg->vm_id = le32_to_cpu(raw.vm_id);
	cfg->gpu_state = le32_to_cpu(raw.gpu_state);
	cfg->gpu_epoch = le32_to_cpu(raw.gpu_epoch);
}

static void vgpu_log_config(struct vgpu *vgpu, const char *what)
{
	const struct vgpu_cfg *c = &vgpu->cfg;

	dev_info(&vgpu->vdev->dev,
		 "%s: %s pool %c priority %u (%s) vm_id %u gpu %s (epoch %u)\n",
		 vgpu->name, what,
		 c->pool_id < 0x80 && isgraph(c->pool_id) ?
		 (char)c->pool_id : '?', c->priority,
		 vgpu_prio_name(c->priority), c->vm_id,
		 vgpu_gpu_state_name(c->gpu_state), c->gpu_epoch);
}

static void vgpu_config_work(struct work_struct *work)
{
	struct vgpu *vgpu = container_of(work, struct vgpu, config_work);
	struct device *mdev = vgpu->misc.this_device;
	struct vgpu_cfg cfg;

	vgpu_read_config(vgpu->vdev, &cfg);
	mutex_lock(&vgpu->cfg_lock);
	vgpu->cfg = cfg;
	vgpu_log_config(vgpu, "config changed:");
	mutex_unlock(&vgpu->cfg_lock);

	/* Let pollers of the attributes see the change. */
	sysfs_notify(&mdev->kobj, NULL, "pool_id");
	sysfs_notify(&mdev->kobj, NULL, "priority");
	sysfs_notify(&mdev->kobj, NULL, "priority_name");
	sysfs_notify(&mdev->kobj, NULL, "vm_id");
	sysfs_notify(&mdev->kobj, NULL, "gpu_state");
	sysfs_notify(&mdev->kobj, NULL, "gpu_state_name");
	sysfs_notify(&mdev->kobj, NULL, "gpu_epoch");
}

/* May run in interrupt context: defer the config reads to a work item. */
static void vgpu_config_changed(struct virtio_device *vdev)
{
	struct vgpu *vgpu = vdev->priv;

	schedule_work(&vgpu->config_work);
}

static void vgpu_reset(struct virtio_device *vdev)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 17, 0)
	virtio_reset_device(vdev);
#else
	vdev->config->reset(vdev);
#endif
}

static int vgpu_probe(struct virtio_device *vdev)
{
	struct vgpu *vgpu;
	struct vgpu_cfg cfg;
	int err;

	if (!virtio_has_feature(vdev, VIRTIO_F_VERSION_1)) {
		dev_err(&vdev->dev, "device lacks VIRTIO_F_VERSION_1\n");
		return -ENODEV;
	}
	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config access disabled\n");
		return -EINVAL;
	}

	vgpu_read_config(vdev, &cfg);
	if (cfg.magic != VGPU_MAGIC) {
		dev_err(&vdev->dev,
			"not a vgpu device: config magic 0x%08x, expected 0x%08x\n",
			cfg.magic, VGPU_MAGIC);
		return -ENODEV;
	}
	if (cfg.version >> 16 != VGPU_VERSION >> 16) {
		dev_err(&vdev->dev,
			"unsupported vgpu contract version %u.%u (driver speaks %u.x)\n",
			cfg.version >> 16, cfg.version & 0xffff,
			VGPU_VERSION >> 16);
		return -ENODEV;
	}

	vgpu = kzalloc(sizeof(*vgpu), GFP_KERNEL);
	if (!vgpu)
		return -ENOMEM;
	kref_init(&vgpu->ref);
	spin_lock_init(&vgpu->lock);
	init_waitqueue_head(&vgpu->space_wq);
	mutex_init(&vgpu->cfg_lock);
	INIT_WORK(&vgpu->config_work, vgpu_config_work);
	vgpu->vdev = vdev;
	vgpu->cfg = cfg;
	vdev->priv = vgpu;

	err = ida_alloc(&vgpu_ida, GFP_KERNEL);
	if (err < 0)
		goto err_free;
	vgpu->index = err;
	snprintf(vgpu->name, sizeof(vgpu->name), "vgpu%d", vgpu->index);

	vgpu->vq = virtio_find_single_vq(vdev, vgpu_vq_done, "requests");
	if (IS_ERR(vgpu->vq)) {
		err = PTR_ERR(vgpu->vq);
		dev_err(&vdev->dev, "cannot set up the request queue: %d\n",
			err);
		goto err_ida;
	}

	/* The ring must be live before user space can reach it. */
	virtio_device_ready(vdev);

	vgpu->misc.minor = MISC_DYNAMIC_MINOR;
	vgpu->misc.name = vgpu->name;
	vgpu->misc.fops = &vgpu_fops;
	vgpu->misc.parent = &vdev->dev;
	vgpu->misc.groups = vgpu_groups;
	err = misc_register(&vgpu->misc);
	if (err) {
		dev_err(&vdev->dev, "cannot register /dev/%s: %d\n",
			vgpu->name, err);
		goto err_vq;
	}

	/* debugfs is optional: failures are not errors (and not checked). */
	vgpu->debugfs = debugfs_create_dir(vgpu->name, vgpu_debugfs_root);
	debugfs_create_file("stats", 0444, vgpu->debugfs, vgpu,
			    &vgpu_stats_fops);

	vgpu_log_config(vgpu, "probed:");
	dev_info(&vdev->dev, "%s: ring size %u, version 0x%08x%s%s\n",
		 vgpu->name, virtqueue_get_vring_size(vgpu->vq), cfg.version,
		 virtio_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX) ?
		 ", event_idx" : "",
		 virtio_has_feature(vdev, VIRTIO_RING_F_INDIRECT_DESC) ?
		 ", indirect" : "");
	return 0;

err_vq:
	vgpu_reset(vdev);
	vdev->config->del_vqs(vdev);
err_ida:
	ida_free(&vgpu_ida, vgpu->index);
err_free:
	vdev->priv = NULL;
	kfree(vgpu);
	return err;
}

static void vgpu_remove(struct virtio_device *vdev)
{
	struct vgpu *vgpu = vdev->priv;
	struct vgpu_request *req;
	unsigned int len;
	LIST_HEAD(to_free);

	/* The core disabled config notifications before calling us. */
	cancel_work_sync(&vgpu->config_work);

	spin_lock_irq(&vgpu->lock);
	vgpu->dead = true;
	spin_unlock_irq(&vgpu->lock);
	wake_up_all(&vgpu->space_wq);

	/* Waits for readers of stats that are still running. */
	debugfs_remove_recursive(vgpu->debugfs);

	/* No new opens; open files keep @vgpu alive through the kref. */
	misc_deregister(&vgpu->misc);

	/* Stop the device: after this it touches no buffer and raises no irq. */
	vgpu_reset(vdev);

	spin_lock_irq(&vgpu->lock);
	/* Deliver what the device finished before the reset... */
	while ((req = virtqueue_get_buf(vgpu->vq, &len)))
		vgpu_req_finish(req, len, 0, &to_free);
	/* ...and fail the rest: every waiter gets -ENODEV. */
	while ((req = virtqueue_detach_unused_buf(vgpu->vq)))
		vgpu_req_finish(req, 0, -ENODEV, &to_free);
	spin_unlock_irq(&vgpu->lock);
	vgpu_free_list(&to_free);

	vdev->config->del_vqs(vdev);
	dev_info(&vdev->dev, "%s: removed\n", vgpu->name);
	ida_free(&vgpu_ida, vgpu->index);
	vdev->priv = NULL;
	kref_put(&vgpu->ref, vgpu_release);
}

static const struct virtio_device_id id_table[] = {
	{ VIRTIO_ID_VGPU, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

/*
 * No device-specific feature bits in v1. VIRTIO_F_VERSION_1 is negotiated by
 * virtio_pci (modern), EVENT_IDX and INDIRECT_DESC by virtio_ring whenever the
 * device offers them.
 */
static struct virtio_driver virtio_vgpu_driver = {
	.driver.name		= KBUILD_MODNAME,
	.driver.owner		= THIS_MODULE,
	.id_table		= id_table,
	.probe			= vgpu_probe,
	.remove			= vgpu_remove,
	.config_changed		= vgpu_config_changed,
};

static int __init virtio_vgpu_init(void)
{
	int err;

	vgpu_debugfs_root = debugfs_create_dir(KBUILD_MODNAME, NULL);
	err = register_virtio_driver(&virtio_vgpu_driver);
	if (err)
		debugfs_remove_recursive(vgpu_debugfs_root);
	return err;
}

static void __exit virtio_vgpu_exit(void)
{
	unregister_virtio_driver(&virtio_vgpu_driver);
	debugfs_remove_recursive(vgpu_debugfs_root);
}

module_init(virtio_vgpu_init);
module_exit(virtio_vgpu_exit);
MODULE_DEVICE_TABLE(virtio, id_table);
MODULE_DESCRIPTION("Virtio vgpu driver: GPU requests to the host");
MODULE_LICENSE("GPL");
