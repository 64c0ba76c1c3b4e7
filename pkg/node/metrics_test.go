package node

import (
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/stack"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func TestHistogramQuantileSince(t *testing.T) {
	h := newMetrics(func() Status { return Status{} }).barriers
	for i := 0; i < 100; i++ {
		h.Observe(0.0003) // le 0.5 ms
	}
	before := snapshot(h)
	for i := 0; i < 98; i++ {
		h.Observe(0.004) // le 5 ms
	}
	h.Observe(0.045) // le 50 ms
	h.Observe(7)     // over the last bound
	after := snapshot(h)
	if n := after.Total(); n != 200 {
		t.Fatalf("total %d, want 200", n)
	}
	if q := after.Quantile(0.5, before); q != 5 {
		t.Fatalf("p50 since the first snapshot: %g ms, want 5", q)
	}
	if q := after.Quantile(0.99, before); q != 50 {
		t.Fatalf("p99 since the first snapshot: %g ms, want 50", q)
	}
	if q := after.Quantile(1, before); !math.IsInf(q, 1) {
		t.Fatalf("max: %g, want +Inf (past the last bound)", q)
	}
	if q := after.Quantile(0.5, Histogram{}); q != 0.5 {
		t.Fatalf("p50 since start: %g ms, want 0.5", q)
	}
	if q := before.Quantile(0.5, before); !math.IsNaN(q) {
		t.Fatalf("no events: %g, want NaN", q)
	}
}

func TestWaitingOldest(t *testing.T) {
	var w waiting
	t0 := time.Unix(1000, 0)
	endFirst := w.begin(t0)
	endSecond := w.begin(t0.Add(time.Second))
	if n, age := w.oldest(t0.Add(3 * time.Second)); n != 2 || age != 3*time.Second {
		t.Fatalf("two waiting: %d, oldest %s; want 2, 3s", n, age)
	}
	endFirst()
	if n, age := w.oldest(t0.Add(3 * time.Second)); n != 1 || age != 2*time.Second {
		t.Fatalf("after the first ended: %d, oldest %s; want 1, 2s", n, age)
	}
	endSecond()
	if n, age := w.oldest(t0.Add(3 * time.Second)); n != 0 || age != 0 {
		t.Fatalf("none waiting: %d, oldest %s; want 0, 0s", n, age)
	}
}

// serving is the status of a primary that has every optional part: two
// directories (one async, resyncing), capture counters, a VIP, two
// services (one failing) and a durability call that waits.
func serving() Status {
	return Status{State: "PRIM", Epoch: 7, PeerState: PeerStatus{Seen: true, Heartbeats: 120, Refused: 2, Lost: 3},
		VIP:      &VIPStatus{Held: true},
		Services: []stack.Status{{Name: "hello", Healthy: true}, {Name: "db"}},
		Capture:  &capture.Counters{Seq: 5000, Lost: 12}, RingBytes: 4096,
		LagMs: 1500, LagBytes: 2048, BarriersWaiting: 1, BarrierOldestWaitMs: 7000,
		Dirs: []replica.Status{
			{Dir: "db", Connected: true, LagMs: 1500, MaxLagMs: 2000, Mode: "async", WireBytes: 100, ChangedBytes: 300, FullSyncs: 1,
				BitmapBytes: 8192, Resync: replica.ResyncStatus{Active: true, Mode: "bitmap", BytesPlanned: 1000, BytesSent: 250,
					FilesTotal: 40, FilesCompared: 10, EtaSec: 30}},
			{Dir: "www", Mode: "sync", PeerCannotApply: "disk full", DroppedChanges: 4, WireBytes: 50, ChangedBytes: 60},
		},
		// www's filesystem unknown: no free space series for it.
		Copies: []CopyStatus{{Dir: "db", FreeBytes: 1 << 30, SizeBytes: 8 << 30}, {Dir: "www"}}}
}

// scrape gets the handler's page with the Accept header accept.
func scrape(t *testing.T, m *metrics, accept string) (contentType, body string) {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	rec := httptest.NewRecorder()
	m.handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: HTTP %d: %s", rec.Code, rec.Body)
	}
	b, _ := io.ReadAll(rec.Body)
	return rec.Header().Get("Content-Type"), string(b)
}

// families scrapes m as Prometheus does without OpenMetrics and parses it
// strictly: a second TYPE line of one name, as the hand-written page had
// for the lag, fails here.
func families(t *testing.T, m *metrics) map[string]*dto.MetricFamily {
	t.Helper()
	ct, body := scrape(t, m, "")
	if !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Fatalf("content type %q, want the text format 0.0.4", ct)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the scrape: %v\n%s", err, body)
	}
	return fams
}

func TestMetricsScrape(t *testing.T) {
	m := newMetrics(serving)
	m.barriers.Observe(0.004)
	m.lags.Observe(0.02)
	fams := families(t, m)

	for name, typ := range map[string]dto.MetricType{
		"duet_state": dto.MetricType_GAUGE, "duet_epoch": dto.MetricType_GAUGE, "duet_peer_seen": dto.MetricType_GAUGE,
		"duet_heartbeats_received_total": dto.MetricType_COUNTER, "duet_heartbeats_refused_total": dto.MetricType_COUNTER,
		"duet_peer_lost_total": dto.MetricType_COUNTER, "duet_in_sync": dto.MetricType_GAUGE,
		"duet_replication_lag_seconds": dto.MetricType_GAUGE, "duet_replication_lag_bytes": dto.MetricType_GAUGE,
		"duet_shipped_bytes_total": dto.MetricType_COUNTER, "duet_changed_bytes_total": dto.MetricType_COUNTER,
		"duet_resyncs_total": dto.MetricType_COUNTER, "duet_resync_active": dto.MetricType_GAUGE,
		"duet_resync_bytes_planned": dto.MetricType_GAUGE, "duet_resync_bytes_sent": dto.MetricType_GAUGE,
		"duet_resync_files_compared": dto.MetricType_GAUGE, "duet_resync_files_walked": dto.MetricType_GAUGE,
		"duet_resync_eta_seconds": dto.MetricType_GAUGE, "duet_bitmap_bytes": dto.MetricType_GAUGE,
		"duet_peer_connected": dto.MetricType_GAUGE, "duet_peer_cannot_apply": dto.MetricType_GAUGE,
		"duet_dropped_changes": dto.MetricType_GAUGE, "duet_diverged_resyncs": dto.MetricType_GAUGE,
		"duet_dir_lag_seconds":     dto.MetricType_GAUGE,
		"duet_dir_max_lag_seconds": dto.MetricType_GAUGE, "duet_capture_records_total": dto.MetricType_COUNTER,
		"duet_capture_lost_records_total": dto.MetricType_COUNTER, "duet_ring_buffered_bytes": dto.MetricType_GAUGE,
		"duet_vip_held": dto.MetricType_GAUGE, "duet_service_healthy": dto.MetricType_GAUGE,
		"duet_barriers_waiting": dto.MetricType_GAUGE, "duet_barrier_oldest_wait_seconds": dto.MetricType_GAUGE,
		"duet_dir_free_bytes": dto.MetricType_GAUGE, "duet_dir_size_bytes": dto.MetricType_GAUGE,
		"duet_barrier_seconds": dto.MetricType_HISTOGRAM, "duet_replication_batch_lag_seconds": dto.MetricType_HISTOGRAM,
		"process_resident_memory_bytes": dto.MetricType_GAUGE, "go_goroutines": dto.MetricType_GAUGE,
	} {
		f, ok := fams[name]
		if !ok {
			t.Errorf("%s: missing from the scrape", name)
			continue
		}
		if f.GetType() != typ {
			t.Errorf("%s: type %s, want %s", name, f.GetType(), typ)
		}
	}

	value := func(name string, labels ...string) float64 {
		t.Helper()
		for _, mt := range fams[name].GetMetric() {
			match := true
			for i := 0; i+1 < len(labels); i += 2 {
				has := false
				for _, l := range mt.GetLabel() {
					has = has || l.GetName() == labels[i] && l.GetValue() == labels[i+1]
				}
				match = match && has
			}
			if match {
				switch {
				case mt.Gauge != nil:
					return mt.GetGauge().GetValue()
				case mt.Counter != nil:
					return mt.GetCounter().GetValue()
				}
			}
		}
		t.Fatalf("%s%v: no such sample", name, labels)
		return 0
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"duet_state", []string{"state", "PRIM"}, 1},
		{"duet_state", []string{"state", "SECOND"}, 0},
		{"duet_peer_lost_total", nil, 3},
		{"duet_replication_lag_seconds", nil, 1.5},
		{"duet_shipped_bytes_total", nil, 150},
		{"duet_resync_active", []string{"dir", "db", "mode", "bitmap"}, 1},
		{"duet_resync_bytes_sent", []string{"dir", "db"}, 250},
		{"duet_resync_files_walked", []string{"dir", "db"}, 40},
		{"duet_dir_max_lag_seconds", []string{"dir", "db"}, 2},
		{"duet_peer_cannot_apply", []string{"dir", "www"}, 1},
		{"duet_capture_lost_records_total", nil, 12},
		{"duet_service_healthy", []string{"service", "db"}, 0},
		{"duet_barrier_oldest_wait_seconds", nil, 7},
		{"duet_dir_free_bytes", []string{"dir", "db"}, 1 << 30},
		{"duet_dir_size_bytes", []string{"dir", "db"}, 8 << 30},
	} {
		if v := value(c.name, c.labels...); v != c.want {
			t.Errorf("%s%v = %g, want %g", c.name, c.labels, v, c.want)
		}
	}
	if n := len(fams["duet_dir_free_bytes"].GetMetric()); n != 1 {
		t.Errorf("duet_dir_free_bytes: %d series, want 1 (www's filesystem is unknown)", n)
	}
	// A sync directory has no lag bound.
	if n := len(fams["duet_dir_max_lag_seconds"].GetMetric()); n != 1 {
		t.Errorf("duet_dir_max_lag_seconds: %d series, want 1 (the async directory)", n)
	}
	h := fams["duet_barrier_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 1 || len(h.GetBucket()) != len(latencyBuckets)+1 || h.GetBucket()[4].GetUpperBound() != 0.005 || h.GetBucket()[4].GetCumulativeCount() != 1 {
		t.Errorf("duet_barrier_seconds: %v, want one observation in the 5 ms bucket of the %d bounds and +Inf", h, len(latencyBuckets))
	}

	// The lab's cluster test reads these lines as text.
	_, body := scrape(t, m, "")
	for _, want := range []string{`duet_state{state="PRIM"} 1`, "duet_vip_held 1", "duet_peer_seen 1",
		`duet_service_healthy{service="hello"} 1`, "duet_barrier_seconds_count 1", "\nduet_peer_lost_total 3\n"} {
		if !strings.Contains(body, want) {
			t.Errorf("the text page lacks %q", want)
		}
	}

	// promtool check metrics runs the same linter.
	var list []*dto.MetricFamily
	for _, f := range fams {
		list = append(list, f)
	}
	problems, err := promlint.NewWithMetricFamilies(list).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

func TestMetricsOpenMetrics(t *testing.T) {
	m := newMetrics(serving)
	ct, body := scrape(t, m, "application/openmetrics-text; version=1.0.0")
	if !strings.HasPrefix(ct, "application/openmetrics-text") {
		t.Fatalf("asked for OpenMetrics, got content type %q", ct)
	}
	if !strings.HasSuffix(body, "# EOF\n") {
		t.Errorf("the OpenMetrics page does not end with # EOF:\n%s", body[max(0, len(body)-200):])
	}
	for _, want := range []string{"# TYPE duet_barrier_seconds histogram\n", `duet_barrier_seconds_bucket{le="+Inf"} 0`,
		"# TYPE duet_peer_lost counter\n", "\nduet_peer_lost_total 3"} {
		if !strings.Contains(body, want) {
			t.Errorf("the OpenMetrics page lacks %q", want)
		}
	}
}

// Nodes of one process (the tests run several) do not share metrics.
func TestMetricsPerNode(t *testing.T) {
	a, b := newMetrics(serving), newMetrics(func() Status { return Status{State: "SECOND"} })
	a.barriers.Observe(0.001)
	fa, fb := families(t, a), families(t, b)
	if n := fb["duet_barrier_seconds"].GetMetric()[0].GetHistogram().GetSampleCount(); n != 0 {
		t.Errorf("node b counts %d barriers of node a", n)
	}
	if _, ok := fb["duet_resync_active"]; ok {
		t.Errorf("a secondary exports the primary's directories")
	}
	if fa["duet_barrier_seconds"].GetMetric()[0].GetHistogram().GetSampleCount() != 1 {
		t.Errorf("node a lost its barrier")
	}
}

// TestPprofOnlyWhenAsked: the metrics address serves the runtime's
// profiles only with pprof: true.
func TestPprofOnlyWhenAsked(t *testing.T) {
	m := newMetrics(serving)
	for _, on := range []bool{false, true} {
		rec := httptest.NewRecorder()
		metricsMux(m, on).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/pprof/heap", nil))
		switch {
		case on && (rec.Code != http.StatusOK || rec.Body.Len() == 0):
			t.Fatalf("pprof on: HTTP %d, %d bytes", rec.Code, rec.Body.Len())
		case !on && rec.Code != http.StatusNotFound:
			t.Fatalf("pprof off: HTTP %d, want 404", rec.Code)
		}
		rec = httptest.NewRecorder()
		metricsMux(m, on).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		if rec.Code != http.StatusOK {
			t.Fatalf("pprof %v: /metrics HTTP %d", on, rec.Code)
		}
	}
}

// TestPprofWarnsOffLoopback: only a loopback metrics address keeps the
// profiles to this host; any other makes the daemon warn.
func TestPprofWarnsOffLoopback(t *testing.T) {
	for addr, want := range map[string]bool{"127.0.0.1:9788": true, "[::1]:9788": true, "0.0.0.0:9788": false, "[::]:9788": false, "10.250.0.1:9788": false} {
		a, err := net.ResolveTCPAddr("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := loopback(a); got != want {
			t.Errorf("loopback(%s) = %v, want %v", addr, got, want)
		}
	}
}
