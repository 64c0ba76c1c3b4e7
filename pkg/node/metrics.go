package node

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
)

// histogram is a Prometheus-style cumulative histogram of durations.
type histogram struct {
	mu     sync.Mutex
	counts [len(latencyBuckets) + 1]uint64
	sum    time.Duration
	n      uint64
}

// latencyBuckets are the upper bounds, in seconds, of barrier latency and
// replication lag.
var latencyBuckets = [...]float64{0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 5}

func (h *histogram) observe(d time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	i := 0
	for i < len(latencyBuckets) && d.Seconds() > latencyBuckets[i] {
		i++
	}
	h.counts[i]++
	h.sum += d
	h.n++
}

// Histogram is a histogram's state for status: Counts[i] events took at
// most BoundsMs[i] (and more than the bound before); the last count is
// over the last bound.
type Histogram struct {
	BoundsMs []float64 `json:"bounds_ms"`
	Counts   []uint64  `json:"counts"`
}

func (h *histogram) snapshot() Histogram {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := Histogram{Counts: append([]uint64(nil), h.counts[:]...)}
	for _, b := range latencyBuckets {
		s.BoundsMs = append(s.BoundsMs, b*1000)
	}
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

func (h *histogram) write(w io.Writer, name, help string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name)
	var cum uint64
	for i, b := range latencyBuckets {
		cum += h.counts[i]
		fmt.Fprintf(w, "%s_bucket{le=\"%g\"} %d\n", name, b, cum)
	}
	fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %g\n%s_count %d\n", name, h.n, name, h.sum.Seconds(), name, h.n)
}

// serveMetrics answers Prometheus scrapes on /metrics.
func (n *Node) serveMetrics(ctx context.Context, ln net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		n.writeMetrics(w)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	srv.Serve(ln)
}

func (n *Node) writeMetrics(w io.Writer) {
	s := n.Status()
	gauge := func(name, help string, v float64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n%s %g\n", name, help, name, name, v)
	}
	counter := func(name, help string, v float64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %g\n", name, help, name, name, v)
	}
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	fmt.Fprintf(w, "# HELP duet_state Node state (1 for the current one).\n# TYPE duet_state gauge\n")
	for st := cluster.Stop; st <= cluster.Alone; st++ {
		fmt.Fprintf(w, "duet_state{state=%q} %g\n", st.String(), b2f(s.State == st.String()))
	}
	gauge("duet_epoch", "Data generation of this copy.", float64(s.Epoch))
	gauge("duet_peer_seen", "1 while heartbeats from the peer arrive.", b2f(s.PeerState.Seen))
	counter("duet_heartbeats_received_total", "Valid heartbeats from the peer.", float64(s.PeerState.Heartbeats))
	counter("duet_heartbeats_refused_total", "Heartbeats refused (bad key, wrong sender, malformed).", float64(s.PeerState.Refused))
	counter("duet_peer_lost_total", "Times the peer was declared lost (fault-detection timeout).", float64(s.PeerState.Lost))
	gauge("duet_in_sync", "1 when both copies are in sync.", b2f(s.InSync))
	gauge("duet_replication_lag_seconds", "Age of the oldest change not yet acknowledged by the peer.", s.LagMs/1000)
	gauge("duet_replication_lag_bytes", "Compressed bytes sent and not yet acknowledged.", float64(s.LagBytes))
	var wire, changed, full float64
	for _, d := range s.Dirs {
		wire += float64(d.WireBytes)
		changed += float64(d.ChangedBytes)
		full += float64(d.FullSyncs)
	}
	counter("duet_shipped_bytes_total", "Bytes sent to the peer (compressed, on the wire), this primary term.", wire)
	counter("duet_changed_bytes_total", "Bytes changed by writers, this primary term.", changed)
	counter("duet_resyncs_total", "Resyncs, this primary term.", full)
	fmt.Fprintf(w, "# HELP duet_resync_active 1 while a resync of the directory runs.\n# TYPE duet_resync_active gauge\n")
	for _, d := range s.Dirs {
		fmt.Fprintf(w, "duet_resync_active{dir=%q,mode=%q} %g\n", d.Dir, d.Resync.Mode, b2f(d.Resync.Active))
	}
	for _, m := range []struct {
		name, help string
		v          func(d *replica.Status) float64
	}{
		{"duet_resync_bytes_planned", "Bytes the current (or last) resync sends.", func(d *replica.Status) float64 { return float64(d.Resync.BytesPlanned) }},
		{"duet_resync_bytes_sent", "Bytes the current (or last) resync has sent.", func(d *replica.Status) float64 { return float64(d.Resync.BytesSent) }},
		{"duet_resync_files_compared", "Files the current (or last) resync compared by checksums.", func(d *replica.Status) float64 { return float64(d.Resync.FilesCompared) }},
		{"duet_resync_files_total", "Files in the tree the current (or last) resync walked.", func(d *replica.Status) float64 { return float64(d.Resync.FilesTotal) }},
		{"duet_resync_eta_seconds", "Estimated time left of the current resync.", func(d *replica.Status) float64 { return d.Resync.EtaSec }},
		{"duet_bitmap_bytes", "Data marked in the modification bitmap: what a resync would send now.", func(d *replica.Status) float64 { return float64(d.BitmapBytes) }},
		{"duet_peer_connected", "1 while the directory's replication connection to the peer is up.", func(d *replica.Status) float64 { return b2f(d.Connected) }},
		{"duet_peer_cannot_apply", "1 while the peer refuses the directory's batches (its disk is full...): see duet status.", func(d *replica.Status) float64 { return b2f(d.PeerCannotApply != "") }},
		{"duet_dropped_changes", "Changes that could not be shipped after retries; each started a resync, the peer out of sync until it ended.", func(d *replica.Status) float64 { return float64(d.DroppedChanges) }},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n", m.name, m.help, m.name)
		for i := range s.Dirs {
			fmt.Fprintf(w, "%s{dir=%q} %g\n", m.name, s.Dirs[i].Dir, m.v(&s.Dirs[i]))
		}
	}
	if s.VIP != nil {
		gauge("duet_vip_held", "1 when this node holds the VIP.", b2f(s.VIP.Held))
	}
	fmt.Fprintf(w, "# HELP duet_service_healthy 1 when the service passes its check.\n# TYPE duet_service_healthy gauge\n")
	for _, sv := range s.Services {
		fmt.Fprintf(w, "duet_service_healthy{service=%q} %g\n", sv.Name, b2f(sv.Healthy))
	}
	n.barriers.write(w, "duet_barrier_seconds", "Time durability calls waited for the peer.")
	n.lags.write(w, "duet_replication_lag_seconds", "Per acknowledged batch: from the capture of its oldest change to the peer's acknowledgement.")
}
