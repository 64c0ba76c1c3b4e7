package node

import (
	"math"
	"testing"
	"time"
)

func TestHistogramQuantileSince(t *testing.T) {
	var h histogram
	for i := 0; i < 100; i++ {
		h.observe(300 * time.Microsecond) // le 0.5 ms
	}
	before := h.snapshot()
	for i := 0; i < 98; i++ {
		h.observe(4 * time.Millisecond) // le 5 ms
	}
	h.observe(45 * time.Millisecond) // le 50 ms
	h.observe(7 * time.Second)       // over the last bound
	after := h.snapshot()
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
