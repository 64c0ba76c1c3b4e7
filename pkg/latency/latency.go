// Package latency records how long the stages of a durability call take,
// in histograms fine enough (about 9 % per bucket, from 1 µs) to tell a
// 50 µs network round trip from a 300 µs flush, and cheap enough (one
// atomic add) to stay on the hot path.
package latency

import (
	"math"
	"sync/atomic"
	"time"
)

// bucketsPerOctave sets the resolution: bucket i holds durations up to
// 2^(i/bucketsPerOctave) µs, so a quantile read from the counts is within
// about 9 % of the true one.
const bucketsPerOctave = 8

// Buckets is the number of buckets: 1 µs to 2^27 µs (134 s); longer ones
// count in the last.
const Buckets = 27*bucketsPerOctave + 1

// Bound is the upper bound of bucket i.
func Bound(i int) time.Duration {
	return time.Duration(math.Exp2(float64(i)/bucketsPerOctave) * float64(time.Microsecond))
}

func bucket(d time.Duration) int {
	if d <= time.Microsecond {
		return 0
	}
	i := int(math.Ceil(math.Log2(float64(d)/float64(time.Microsecond)) * bucketsPerOctave))
	return min(i, Buckets-1)
}

// Histogram counts durations; safe for concurrent use.
type Histogram struct {
	counts [Buckets]atomic.Uint64
}

// Observe counts d.
func (h *Histogram) Observe(d time.Duration) { h.counts[bucket(d)].Add(1) }

// Since counts the time since start.
func (h *Histogram) Since(start time.Time) { h.Observe(time.Since(start)) }

// Counts is a histogram's state: Counts[i] durations fell in bucket i
// (see Bound).
type Counts []uint64

// Snapshot returns the counts so far.
func (h *Histogram) Snapshot() Counts {
	c := make(Counts, Buckets)
	for i := range h.counts {
		c[i] = h.counts[i].Load()
	}
	return c
}

// Total is the number of durations counted.
func (c Counts) Total() uint64 {
	var n uint64
	for _, v := range c {
		n += v
	}
	return n
}

// Minus is what was counted after since, an earlier snapshot of the same
// histogram (nil: nothing before).
func (c Counts) Minus(since Counts) Counts {
	d := make(Counts, len(c))
	for i, v := range c {
		if i < len(since) {
			v -= since[i]
		}
		d[i] = v
	}
	return d
}

// Plus is c and other counted together.
func (c Counts) Plus(other Counts) Counts {
	s := make(Counts, max(len(c), len(other)))
	copy(s, c)
	for i, v := range other {
		s[i] += v
	}
	return s
}

// Quantile is the upper bound of the bucket that holds quantile q (0 < q
// ≤ 1) of the durations counted; 0 if none.
func (c Counts) Quantile(q float64) time.Duration {
	total := c.Total()
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i, v := range c {
		seen += v
		if seen >= rank && v > 0 {
			return Bound(i)
		}
	}
	return Bound(len(c) - 1)
}
