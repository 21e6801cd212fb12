-- Migration 3: a per-VM bound on the guest memory its frontend may share
-- (SET_MEM_TABLE, all regions), MiB. NULL: the daemon's max_guest_memory_mib
-- (config/vgpu.toml), which is what every VM had before.

ALTER TABLE vms ADD COLUMN max_guest_memory_mib INTEGER
    CHECK (max_guest_memory_mib IS NULL OR max_guest_memory_mib BETWEEN 1 AND 1099511627775);
