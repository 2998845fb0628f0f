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

	volumes, snapshots, snapCow, snapLimit, snapInvalid, volAlloc, volSize *prometheus.Desc
}

// NewMetrics registers the collectors in reg; the store gauges read store.
func NewMetrics(reg prometheus.Registerer, store Store) *Metrics {
	m := &Metrics{
		store: store,
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "csi_snap_request_duration_seconds",
			Help:    "Latency of CSI calls in seconds, by method and gRPC code.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms .. ~131 s
		}, []string{"method", "code"}),
		volumes:     prometheus.NewDesc("csi_snap_volumes", "Volumes in the store.", nil, nil),
		snapshots:   prometheus.NewDesc("csi_snap_snapshots", "Snapshots in the store.", nil, nil),
		snapCow:     prometheus.NewDesc("csi_snap_snapshot_cow_bytes", "Bytes copied out to keep a snapshot's content.", []string{"snapshot_id", "volume_id"}, nil),
		snapLimit:   prometheus.NewDesc("csi_snap_snapshot_cow_limit_bytes", "COW byte limit of a snapshot (0 = unlimited).", []string{"snapshot_id"}, nil),
		snapInvalid: prometheus.NewDesc("csi_snap_snapshot_invalid", "1 when a snapshot went over its COW limit and is invalid.", []string{"snapshot_id"}, nil),
		volAlloc:    prometheus.NewDesc("csi_snap_volume_allocated_bytes", "Bytes of a volume allocated in the store.", []string{"volume_id"}, nil),
		volSize:     prometheus.NewDesc("csi_snap_volume_size_bytes", "Size of a volume in bytes.", []string{"volume_id"}, nil),
	}
	reg.MustRegister(m.latency, m)
	return m
}

func (m *Metrics) observe(fullMethod string, code codes.Code, d time.Duration) {
	m.latency.WithLabelValues(path.Base(fullMethod), code.String()).Observe(d.Seconds())
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.volumes, m.snapshots, m.snapCow, m.snapLimit, m.snapInvalid, m.volAlloc, m.volSize} {
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
}
