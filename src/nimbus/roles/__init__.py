"""The region's processes: controller, worker and gateway, each wired from the
seams (store, blobs, queue, cluster control plane, data path)."""
