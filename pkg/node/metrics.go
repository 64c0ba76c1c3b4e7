package node

import (
	"context"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
)

// latencyBuckets are the upper bounds, in seconds, of barrier latency and
// replication lag.
var latencyBuckets = []float64{0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5}

// metrics is a node's Prometheus registry: its own, not the global one,
// since a test runs several nodes in one process. The node's state is read
// when a scrape comes (stateCollector); the histograms are fed as events
// happen and also give `duet status` its quantiles.
type metrics struct {
	reg      *prometheus.Registry
	barriers prometheus.Histogram
	lags     prometheus.Histogram
}

// newMetrics registers the node's metrics, whose state status returns at
// each scrape, and the process and Go runtime collectors.
func newMetrics(status func() Status) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		barriers: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "duet_barrier_seconds",
			Help: "Time durability calls waited for the peer.", Buckets: latencyBuckets}),
		lags: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "duet_replication_batch_lag_seconds",
			Help: "Per acknowledged batch: from the capture of its oldest change to the peer's acknowledgement.", Buckets: latencyBuckets}),
	}
	m.reg.MustRegister(m.barriers, m.lags, stateCollector{status},
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), collectors.NewGoCollector())
	return m
}

// handler serves the registry, as OpenMetrics to a scraper that asks for it.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{EnableOpenMetrics: true})
}

// serveMetrics answers Prometheus scrapes on /metrics, and with pprof
// the profiles at /debug/pprof/.
func (n *Node) serveMetrics(ctx context.Context, ln net.Listener) {
	// Idle keep-alive connections are closed: on an address other than
	// loopback anyone could hold them open by the thousand (a review).
	srv := &http.Server{Handler: metricsMux(n.metrics, n.cfg.Pprof), ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout: 30 * time.Second, ReadTimeout: 30 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	srv.Serve(ln)
}

// metricsMux serves m on /metrics, and the runtime's profiles on
// /debug/pprof/ if withPprof.
func metricsMux(m *metrics, withPprof bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.handler())
	if withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Histogram is a histogram's state for status: Counts[i] events took at
// most BoundsMs[i] (and more than the bound before); the last count is
// over the last bound.
type Histogram struct {
	BoundsMs []float64 `json:"bounds_ms"`
	Counts   []uint64  `json:"counts"`
}

// snapshot reads h back for status: one source for the scrape and the
// status, and Write gives a consistent copy while observations go on.
func snapshot(h prometheus.Histogram) Histogram {
	var m dto.Metric
	h.Write(&m) // a histogram's Write returns no error
	var s Histogram
	var below uint64
	for _, b := range m.GetHistogram().GetBucket() {
		s.BoundsMs = append(s.BoundsMs, b.GetUpperBound()*1000)
		s.Counts = append(s.Counts, b.GetCumulativeCount()-below)
		below = b.GetCumulativeCount()
	}
	s.Counts = append(s.Counts, m.GetHistogram().GetSampleCount()-below)
	return s
}

// Total is the number of events counted.
func (h Histogram) Total() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// Quantile returns the bound under which fraction q of the events fell
// (+Inf past the last bound, NaN without events), counting only what
// happened since the earlier snapshot `since` (zero value: since start).
func (h Histogram) Quantile(q float64, since Histogram) float64 {
	var total uint64
	d := make([]uint64, len(h.Counts))
	for i := range h.Counts {
		d[i] = h.Counts[i]
		if i < len(since.Counts) {
			d[i] -= since.Counts[i]
		}
		total += d[i]
	}
	if total == 0 {
		return math.NaN()
	}
	var cum uint64
	for i, c := range d {
		cum += c
		if float64(cum) >= q*float64(total) {
			if i < len(h.BoundsMs) {
				return h.BoundsMs[i]
			}
			break
		}
	}
	return math.Inf(1)
}

// waiting tracks the durability calls in progress: a stalled call shows
// in the age of the oldest while it waits, the histogram counts it only
// once it ends. The zero value is ready.
type waiting struct {
	mu    sync.Mutex
	next  uint64
	since map[uint64]time.Time
}

// begin records a call that started at start; the returned func ends it.
func (w *waiting) begin(start time.Time) (end func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.since == nil {
		w.since = map[uint64]time.Time{}
	}
	id := w.next
	w.next++
	w.since[id] = start
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.since, id)
	}
}

// oldest returns how many calls wait and how long the oldest has, at now.
func (w *waiting) oldest(now time.Time) (n int, age time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, t := range w.since {
		age = max(age, now.Sub(t))
	}
	return len(w.since), age
}

// stateCollector exports what Status says, read at scrape time.
type stateCollector struct{ status func() Status }

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descState            = desc("duet_state", "Node state (1 for the current one).", "state")
	descEpoch            = desc("duet_epoch", "Data generation of this copy.")
	descPeerSeen         = desc("duet_peer_seen", "1 while heartbeats from the peer arrive.")
	descHeartbeats       = desc("duet_heartbeats_received_total", "Valid heartbeats from the peer.")
	descRefused          = desc("duet_heartbeats_refused_total", "Heartbeats refused (bad key, wrong sender, malformed).")
	descPeerLost         = desc("duet_peer_lost_total", "Times the peer was declared lost (fault-detection timeout).")
	descInSync           = desc("duet_in_sync", "1 when both copies are in sync.")
	descLag              = desc("duet_replication_lag_seconds", "Age of the oldest change not yet acknowledged by the peer.")
	descLagBytes         = desc("duet_replication_lag_bytes", "Compressed bytes sent and not yet acknowledged.")
	descShipped          = desc("duet_shipped_bytes_total", "Bytes sent to the peer (compressed, on the wire), this primary term.")
	descChanged          = desc("duet_changed_bytes_total", "Bytes changed by writers, this primary term.")
	descResyncs          = desc("duet_resyncs_total", "Resyncs, this primary term.")
	descResyncActive     = desc("duet_resync_active", "1 while a resync of the directory runs.", "dir", "mode")
	descCaptured         = desc("duet_capture_records_total", "Changes captured in the kernel, this primary term.")
	descRingLost         = desc("duet_capture_lost_records_total", "Changes lost because the capture ring buffer was full, this primary term: each makes a rescan of its file (or tree); raise ring_buffer_kib if it grows.")
	descRingBuffered     = desc("duet_ring_buffered_bytes", "Bytes in the capture ring buffer not read yet.")
	descVIPHeld          = desc("duet_vip_held", "1 when this node holds the VIP.")
	descServiceHealthy   = desc("duet_service_healthy", "1 when the service passes its check.", "service")
	descBarriersWaiting  = desc("duet_barriers_waiting", "Durability calls waiting for the peer now.")
	descBarrierOldestAge = desc("duet_barrier_oldest_wait_seconds", "How long the oldest durability call still waiting has waited (0 when none wait).")
	descFree             = desc("duet_dir_free_bytes", "Space left to unprivileged writers on the filesystem of the directory's copy on this node.", "dir")
	descSize             = desc("duet_dir_size_bytes", "Size of the filesystem of the directory's copy on this node.", "dir")
)

// dirGauges are the per-directory gauges of a primary, labelled dir.
var dirGauges = []struct {
	desc *prometheus.Desc
	v    func(d *replica.Status) float64
	// only, if set, says whether the directory has the metric.
	only func(d *replica.Status) bool
}{
	{desc: desc("duet_resync_bytes_planned", "Bytes the current (or last) resync sends (copying to an empty peer: those read so far).", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.Resync.BytesPlanned) }},
	{desc: desc("duet_resync_bytes_sent", "Bytes the current (or last) resync has sent.", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.Resync.BytesSent) }},
	{desc: desc("duet_resync_files_compared", "Files the current (or last) resync compared by checksums.", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.Resync.FilesCompared) }},
	{desc: desc("duet_resync_files_walked", "Files in the tree the current (or last) resync walked.", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.Resync.FilesTotal) }},
	{desc: desc("duet_resync_eta_seconds", "Estimated time left of the current resync.", "dir"),
		v: func(d *replica.Status) float64 { return d.Resync.EtaSec }},
	{desc: desc("duet_bitmap_bytes", "Data marked in the modification bitmap: what a resync would send now.", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.BitmapBytes) }},
	{desc: desc("duet_peer_connected", "1 while the directory's replication connection to the peer is up.", "dir"),
		v: func(d *replica.Status) float64 { return b2f(d.Connected) }},
	{desc: desc("duet_peer_cannot_apply", "1 while the peer refuses the directory's batches (its disk is full...): see duet status.", "dir"),
		v: func(d *replica.Status) float64 { return b2f(d.PeerCannotApply != "") }},
	{desc: desc("duet_dropped_changes", "Changes that could not be shipped after retries; each started a resync, the peer out of sync until it ended.", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.DroppedChanges) }},
	{desc: desc("duet_diverged_resyncs", "Full comparisons begun because the peer refused a batch its copy did not fit (a change made on the peer, or a bug).", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.DivergedResyncs) }},
	{desc: desc("duet_stuck_capture_marks", "Files whose capture marks were found set with nothing left to forget them (a bug: their changes were no longer captured); each was rescanned.", "dir"),
		v: func(d *replica.Status) float64 { return float64(d.StuckMarks) }},
	{desc: desc("duet_dir_lag_seconds", "Age of the directory's oldest change not yet acknowledged by the peer.", "dir"),
		v: func(d *replica.Status) float64 { return d.LagMs / 1000 }},
	{desc: desc("duet_dir_max_lag_seconds", "The lag bound of an async directory (max_lag): past it, durability calls wait.", "dir"),
		v: func(d *replica.Status) float64 { return d.MaxLagMs / 1000 }, only: func(d *replica.Status) bool { return d.MaxLagMs > 0 }},
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Describe sends every descriptor, also of the metrics a node in another
// state would have, so that the registry checks them all.
func (c stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descState, descEpoch, descPeerSeen, descHeartbeats, descRefused, descPeerLost,
		descInSync, descLag, descLagBytes, descShipped, descChanged, descResyncs, descResyncActive, descCaptured,
		descRingLost, descRingBuffered, descVIPHeld, descServiceHealthy, descBarriersWaiting, descBarrierOldestAge,
		descFree, descSize} {
		ch <- d
	}
	for _, g := range dirGauges {
		ch <- g.desc
	}
}

// Collect reads the status once and sends what it says.
func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.status()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	for st := cluster.Stop; st <= cluster.Alone; st++ {
		gauge(descState, b2f(s.State == st.String()), st.String())
	}
	gauge(descEpoch, float64(s.Epoch))
	gauge(descPeerSeen, b2f(s.PeerState.Seen))
	counter(descHeartbeats, float64(s.PeerState.Heartbeats))
	counter(descRefused, float64(s.PeerState.Refused))
	counter(descPeerLost, float64(s.PeerState.Lost))
	gauge(descInSync, b2f(s.InSync))
	gauge(descLag, s.LagMs/1000)
	gauge(descLagBytes, float64(s.LagBytes))
	var wire, changed, full float64
	for _, d := range s.Dirs {
		wire += float64(d.WireBytes)
		changed += float64(d.ChangedBytes)
		full += float64(d.FullSyncs)
	}
	counter(descShipped, wire)
	counter(descChanged, changed)
	counter(descResyncs, full)
	for i := range s.Dirs {
		d := &s.Dirs[i]
		gauge(descResyncActive, b2f(d.Resync.Active), d.Dir, d.Resync.Mode)
		for _, g := range dirGauges {
			if g.only == nil || g.only(d) {
				gauge(g.desc, g.v(d), d.Dir)
			}
		}
	}
	if s.Capture != nil {
		counter(descCaptured, float64(s.Capture.Seq))
		counter(descRingLost, float64(s.Capture.Lost))
		gauge(descRingBuffered, float64(s.RingBytes))
	}
	if s.VIP != nil {
		gauge(descVIPHeld, b2f(s.VIP.Held))
	}
	for _, sv := range s.Services {
		gauge(descServiceHealthy, b2f(sv.Healthy), sv.Name)
	}
	for _, c := range s.Copies {
		if c.SizeBytes > 0 {
			gauge(descFree, float64(c.FreeBytes), c.Dir)
			gauge(descSize, float64(c.SizeBytes), c.Dir)
		}
	}
	gauge(descBarriersWaiting, float64(s.BarriersWaiting))
	gauge(descBarrierOldestAge, s.BarrierOldestWaitMs/1000)
}
