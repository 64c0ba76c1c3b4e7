package latency

import (
	"testing"
	"time"
)

func TestBucketBounds(t *testing.T) {
	for _, d := range []time.Duration{0, time.Nanosecond, time.Microsecond, 1500 * time.Nanosecond,
		50 * time.Microsecond, 287 * time.Microsecond, 2 * time.Millisecond, time.Second, 100 * time.Second} {
		i := bucket(d)
		if d > Bound(i) {
			t.Errorf("%v in bucket %d, whose bound %v is below it", d, i, Bound(i))
		}
		if i > 0 && d <= Bound(i-1) {
			t.Errorf("%v in bucket %d, but the bucket below (bound %v) holds it", d, i, Bound(i-1))
		}
		if d > time.Microsecond && float64(Bound(i)) > 1.1*float64(d) {
			t.Errorf("%v read back as %v: more than 10 %% off", d, Bound(i))
		}
	}
	if i := bucket(time.Hour); i != Buckets-1 {
		t.Errorf("an hour in bucket %d, want the last (%d)", i, Buckets-1)
	}
}

func TestQuantiles(t *testing.T) {
	var h Histogram
	for i := 1; i <= 100; i++ {
		h.Observe(time.Duration(i) * 10 * time.Microsecond) // 10 µs .. 1 ms
	}
	before := h.Snapshot()
	for i := 0; i < 100; i++ {
		h.Observe(5 * time.Millisecond)
	}
	c := before
	for _, q := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, time.Millisecond}} {
		got := c.Quantile(q.q)
		if got < q.want || float64(got) > 1.1*float64(q.want) {
			t.Errorf("p%v = %v, want %v (within 10 %%)", q.q*100, got, q.want)
		}
	}
	later := h.Snapshot().Minus(before)
	if later.Total() != 100 {
		t.Fatalf("%d counted since the snapshot, want 100", later.Total())
	}
	if got := later.Quantile(0.5); got < 5*time.Millisecond || got > 5500*time.Microsecond {
		t.Errorf("p50 since the snapshot = %v, want 5 ms", got)
	}
	if got := (Counts{}).Quantile(0.5); got != 0 {
		t.Errorf("quantile of nothing = %v, want 0", got)
	}
}
