-- Migration 2: per-VM registration of guest memory with the CUDA driver.
-- 'all': the whole guest RAM is registered (pinned) for zero-copy DMA;
-- 'staging': nothing is registered, every copy is staged (hosts that
-- overcommit memory). Existing VMs keep what they had: 'all'.

ALTER TABLE vms ADD COLUMN register TEXT NOT NULL DEFAULT 'all'
    CHECK (register IN ('all', 'staging'));
