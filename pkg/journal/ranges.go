// Package journal keeps what changed on the primary and is not yet shipped:
// coalesced byte ranges per file, inodes whose metadata changed, and the
// deferred ranges of operations that were still running when reported.
package journal

import "sort"

// Span is the byte range [Off, End).
type Span struct {
	Off, End uint64
}

// Len is the number of bytes in s.
func (s Span) Len() uint64 { return s.End - s.Off }

// Ranges is a set of bytes kept as sorted, disjoint, non-adjacent spans.
type Ranges struct {
	spans []Span
}

// Add inserts [off, off+n). Overlapping and adjacent spans merge.
func (r *Ranges) Add(off, n uint64) {
	if n == 0 {
		return
	}
	end := off + n
	if end < off { // overflow: clamp to the largest offset
		end = ^uint64(0)
	}
	// First span whose end reaches off (adjacency counts as touching).
	i := sort.Search(len(r.spans), func(i int) bool { return r.spans[i].End >= off })
	j := i
	for j < len(r.spans) && r.spans[j].Off <= end {
		if r.spans[j].Off < off {
			off = r.spans[j].Off
		}
		if r.spans[j].End > end {
			end = r.spans[j].End
		}
		j++
	}
	merged := Span{off, end}
	switch {
	case i == j:
		r.spans = append(r.spans, Span{})
		copy(r.spans[i+1:], r.spans[i:])
		r.spans[i] = merged
	default:
		r.spans[i] = merged
		r.spans = append(r.spans[:i+1], r.spans[j:]...)
	}
}

// AddAll inserts every span of o.
func (r *Ranges) AddAll(o *Ranges) {
	for _, s := range o.spans {
		r.Add(s.Off, s.Len())
	}
}

// Spans returns the spans in order. The slice must not be modified.
func (r *Ranges) Spans() []Span { return r.spans }

// Empty reports whether the set holds no byte.
func (r *Ranges) Empty() bool { return len(r.spans) == 0 }

// Bytes is the number of bytes in the set.
func (r *Ranges) Bytes() uint64 {
	var n uint64
	for _, s := range r.spans {
		n += s.Len()
	}
	return n
}

// Clip drops every byte at or beyond size.
func (r *Ranges) Clip(size uint64) {
	i := sort.Search(len(r.spans), func(i int) bool { return r.spans[i].End > size })
	if i < len(r.spans) && r.spans[i].Off < size {
		r.spans[i].End = size
		i++
	}
	r.spans = r.spans[:i]
}
