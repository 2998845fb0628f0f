package driver

import (
	"path"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
)

// Metrics holds the driver's Prometheus collectors. Store gauges are read at
// scrape time from the store's listings, so they cannot drift from it.
type Metrics struct {
	latency *prometheus.HistogramVec
	store   Store

	volumes, snapshots, snapCow, snapLimit, snapInvalid, volAlloc, volSize                  *prometheus.Desc
	copyOuts, copiedBytes, clonedBytes, indexBytes, indexRuns                               *prometheus.Desc
	journalBytes, journalRedone, reclaimFailed, punchZeroed, spaceInvalidated, spaceRefused *prometheus.Desc
	spaceHeld, roomRefused, storeFailed, unheld, hiddenBytes                                *prometheus.Desc
	holder                                                                                  HolderReporter // nil: no such gauge
}

// HolderReporter is a Frontend that keeps its volumes' connections in a
// fuse-holder and says how many it does not (KernelFrontend).
type HolderReporter interface {
	Unheld() int
}

// EngineStats are the engine-wide counters a Store may offer (cow.Stats).
type EngineStats struct {
	CopyOuts, CopiedBytes uint64 // since the store was opened
	ClonedBytes           uint64 // the part of CopiedBytes shared with the data file's blocks (FICLONERANGE), not written
	IndexBytes, IndexRuns int64  // heap bytes and runs of all exception indexes
	JournalBytes          int64  // bytes in the kill journal's files
	JournalRedone         int64  // writes and marks redone from the kill journal when the store was opened
	ReclaimFailed         uint64 // hole punches that only give space back and failed, since the store was opened
	PunchZeroed           uint64 // discarded ranges written with zeros because their hole punch failed, since the store was opened
	SpaceInvalidated      uint64 // snapshots given up below the free-space reserve (--min-free), since the store was opened
	SpaceRefused          uint64 // writes refused with ENOSPC below the free-space reserve, since the store was opened
	SpaceHeld             uint64 // chunks written into holes below the reserve, their snapshots kept and their blocks preallocated, since the store was opened
	RoomRefused           uint64 // operations and writes a full disk refused alone for want of room in the log or the kill journal, since the store was opened
	HiddenBytes           int64  // disk space of deleted volumes and snapshots kept because others depend on them
}

// StatsStore is a Store that reports EngineStats; the metrics use it when
// the store offers it.
type StatsStore interface {
	EngineStats() EngineStats
}

// NewMetrics registers the collectors in reg; the store gauges read store,
// and the holder gauge fe, if it is a HolderReporter.
func NewMetrics(reg prometheus.Registerer, store Store, fe Frontend) *Metrics {
	h, _ := fe.(HolderReporter)
	m := &Metrics{
		store:  store,
		holder: h,
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "csi_snap_request_duration_seconds",
			Help:    "Latency of CSI calls in seconds, by method and gRPC code.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms .. ~131 s
		}, []string{"method", "code"}),
		volumes:          prometheus.NewDesc("csi_snap_volumes", "Volumes in the store.", nil, nil),
		snapshots:        prometheus.NewDesc("csi_snap_snapshots", "Snapshots in the store.", nil, nil),
		snapCow:          prometheus.NewDesc("csi_snap_snapshot_cow_bytes", "Bytes copied out to keep a snapshot's content.", []string{"snapshot_id", "volume_id"}, nil),
		snapLimit:        prometheus.NewDesc("csi_snap_snapshot_cow_limit_bytes", "COW byte limit of a snapshot (0 = unlimited).", []string{"snapshot_id"}, nil),
		snapInvalid:      prometheus.NewDesc("csi_snap_snapshot_invalid", "1 when a snapshot is invalid: it went over its COW limit, or a write would have copied into it while the store was below its free-space reserve (--min-free).", []string{"snapshot_id"}, nil),
		volAlloc:         prometheus.NewDesc("csi_snap_volume_allocated_bytes", "Bytes of a volume allocated in the store.", []string{"volume_id"}, nil),
		volSize:          prometheus.NewDesc("csi_snap_volume_size_bytes", "Size of a volume in bytes.", []string{"volume_id"}, nil),
		copyOuts:         prometheus.NewDesc("csi_snap_copy_outs_total", "Chunks recorded by copy-before-write since the plugin started (once per chunk, whatever the number of snapshots).", nil, nil),
		copiedBytes:      prometheus.NewDesc("csi_snap_copied_bytes_total", "Bytes copied out to COW files since the plugin started (chunks that were holes, never written or discarded, cost none; a chunk of written zeros is copied).", nil, nil),
		clonedBytes:      prometheus.NewDesc("csi_snap_cloned_bytes_total", "The part of csi_snap_copied_bytes_total made by sharing the volume's blocks (FICLONERANGE on XFS with reflink or btrfs) instead of writing them.", nil, nil),
		indexBytes:       prometheus.NewDesc("csi_snap_index_bytes", "Approximate heap bytes held by all exception indexes.", nil, nil),
		indexRuns:        prometheus.NewDesc("csi_snap_index_runs", "Runs (entries after merging) in all exception indexes.", nil, nil),
		journalBytes:     prometheus.NewDesc("csi_snap_kill_journal_bytes", "Bytes in the kill journal's files (page cache; what --survive-kill keeps of writes only memory holds).", nil, nil),
		reclaimFailed:    prometheus.NewDesc("csi_snap_reclaim_failed_total", "Hole punches that only give space back (freed COW chunks, deleted volumes' data) and failed since the plugin started, say for want of space on XFS: that space stays allocated until the next start punches it again.", nil, nil),
		punchZeroed:      prometheus.NewDesc("csi_snap_discard_zeroed_total", "Discarded ranges of volumes that were written with zeros because their hole punch failed (say for want of space on XFS) since the plugin started: they read as zeros but keep their space.", nil, nil),
		spaceInvalidated: prometheus.NewDesc("csi_snap_low_space_invalidated_snapshots_total", "Snapshots given up since the plugin started because a write would have copied into them while the store's file system was below its free-space reserve (--min-free): the volume kept working, the snapshot is lost (csi_snap_snapshot_invalid; its VolumeSnapshot still says readyToUse).", nil, nil),
		spaceRefused:     prometheus.NewDesc("csi_snap_low_space_refused_writes_total", "Writes refused with ENOSPC since the plugin started because the store's file system was below its free-space reserve (--min-free) and the write's copy-before-write would have had to give up a snapshot that may not be (it has clones: a restored or cloned volume reads through it; or a rollback restores it), or was a rollback's own.", nil, nil),
		spaceHeld:        prometheus.NewDesc("csi_snap_low_space_hole_chunks_total", "Chunks first written after a snapshot, while the store's file system was below its free-space reserve (--min-free), that were holes: their copy takes no space, so the snapshots were kept, and the chunk's data blocks were allocated before the write went on.", nil, nil),
		roomRefused:      prometheus.NewDesc("csi_snap_full_disk_refused_total", "Calls and writes the store's full file system refused alone with ENOSPC (ResourceExhausted for CSI calls) since the plugin started, for want of room in its log (new volumes, snapshots, clones, expansions: the log keeps its last room for deletes, which free space) or in its kill journal (first writes after a snapshot, with --survive-kill): nothing was changed, and the store went on. Refusals below the free-space reserve are csi_snap_low_space_refused_writes_total.", nil, nil),
		hiddenBytes:      prometheus.NewDesc("csi_snap_hidden_bytes", "Disk space held for volumes and snapshots their users deleted that others still depend on: deleted volumes kept for their snapshots or for volumes restored or cloned from them (their files' blocks, less what the restores and clones have rewritten since, which is given back), and deleted snapshots of live volumes kept for their restores (their copies, less what the restores have rewritten). Deleting the dependents frees it.", nil, nil),
		journalRedone:    prometheus.NewDesc("csi_snap_kill_journal_redone", "Writes and present marks redone from the kill journal when the plugin started (answered by a plugin that was killed).", nil, nil),
		storeFailed:      prometheus.NewDesc("csi_snap_store_failed", "1 once the store failed, else 0. After a write error it refuses changes until the plugin restarts and reopens it (Probe answers not ready); after a failed fsync only a reboot of the node reopens it (Probe stays ready, the plugin serves I/O errors, and the volume and snapshot counts read 0).", nil, nil),
		unheld:           prometheus.NewDesc("csi_snap_fuse_unheld_volumes", "Attached volumes whose FUSE connection the fuse-holder did not keep at its last check (every 2 s): a restart of the plugin now would fail their I/O. Should be 0.", nil, nil),
	}
	reg.MustRegister(m.latency, m)
	return m
}

func (m *Metrics) observe(fullMethod string, code codes.Code, d time.Duration) {
	m.latency.WithLabelValues(path.Base(fullMethod), code.String()).Observe(d.Seconds())
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.volumes, m.snapshots, m.snapCow, m.snapLimit, m.snapInvalid, m.volAlloc, m.volSize,
		m.copyOuts, m.copiedBytes, m.clonedBytes, m.indexBytes, m.indexRuns, m.journalBytes, m.journalRedone, m.reclaimFailed, m.punchZeroed, m.spaceInvalidated, m.spaceRefused, m.spaceHeld, m.roomRefused, m.storeFailed, m.unheld, m.hiddenBytes} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	vols, snaps := m.store.Volumes(), m.store.Snapshots()
	ch <- prometheus.MustNewConstMetric(m.volumes, prometheus.GaugeValue, float64(len(vols)))
	ch <- prometheus.MustNewConstMetric(m.snapshots, prometheus.GaugeValue, float64(len(snaps)))
	for _, v := range vols {
		ch <- prometheus.MustNewConstMetric(m.volAlloc, prometheus.GaugeValue, float64(v.AllocatedBytes), v.ID)
		ch <- prometheus.MustNewConstMetric(m.volSize, prometheus.GaugeValue, float64(v.Size), v.ID)
	}
	for _, s := range snaps {
		ch <- prometheus.MustNewConstMetric(m.snapCow, prometheus.GaugeValue, float64(s.CowBytes), s.ID, s.VolumeID)
		ch <- prometheus.MustNewConstMetric(m.snapLimit, prometheus.GaugeValue, float64(s.Limit), s.ID)
		inv := 0.0
		if s.Invalid {
			inv = 1
		}
		ch <- prometheus.MustNewConstMetric(m.snapInvalid, prometheus.GaugeValue, inv, s.ID)
	}
	if ss, ok := m.store.(StatsStore); ok {
		st := ss.EngineStats()
		ch <- prometheus.MustNewConstMetric(m.copyOuts, prometheus.CounterValue, float64(st.CopyOuts))
		ch <- prometheus.MustNewConstMetric(m.copiedBytes, prometheus.CounterValue, float64(st.CopiedBytes))
		ch <- prometheus.MustNewConstMetric(m.clonedBytes, prometheus.CounterValue, float64(st.ClonedBytes))
		ch <- prometheus.MustNewConstMetric(m.indexBytes, prometheus.GaugeValue, float64(st.IndexBytes))
		ch <- prometheus.MustNewConstMetric(m.indexRuns, prometheus.GaugeValue, float64(st.IndexRuns))
		ch <- prometheus.MustNewConstMetric(m.journalBytes, prometheus.GaugeValue, float64(st.JournalBytes))
		ch <- prometheus.MustNewConstMetric(m.journalRedone, prometheus.GaugeValue, float64(st.JournalRedone))
		ch <- prometheus.MustNewConstMetric(m.reclaimFailed, prometheus.CounterValue, float64(st.ReclaimFailed))
		ch <- prometheus.MustNewConstMetric(m.punchZeroed, prometheus.CounterValue, float64(st.PunchZeroed))
		ch <- prometheus.MustNewConstMetric(m.spaceInvalidated, prometheus.CounterValue, float64(st.SpaceInvalidated))
		ch <- prometheus.MustNewConstMetric(m.spaceRefused, prometheus.CounterValue, float64(st.SpaceRefused))
		ch <- prometheus.MustNewConstMetric(m.spaceHeld, prometheus.CounterValue, float64(st.SpaceHeld))
		ch <- prometheus.MustNewConstMetric(m.roomRefused, prometheus.CounterValue, float64(st.RoomRefused))
		ch <- prometheus.MustNewConstMetric(m.hiddenBytes, prometheus.GaugeValue, float64(st.HiddenBytes))
	}
	failed := 0.0
	if m.store.Err() != nil {
		failed = 1
	}
	ch <- prometheus.MustNewConstMetric(m.storeFailed, prometheus.GaugeValue, failed)
	if m.holder != nil {
		ch <- prometheus.MustNewConstMetric(m.unheld, prometheus.GaugeValue, float64(m.holder.Unheld()))
	}
}
