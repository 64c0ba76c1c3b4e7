package journal

import (
	"maps"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// PreopTimeout releases a deferred range when no completion was seen (the
// operation failed, or its completion was coalesced away): reading it then
// is correct either way, the operation being over.
const PreopTimeout = time.Second

type preop struct {
	seq  uint64
	span Span
	at   time.Time
}

// File is what changed on one inode since it was last taken.
type File struct {
	Key capture.InodeKey
	// Data are ranges whose current bytes must be shipped.
	Data Ranges
	// Tail, when HasTail, means every byte from Tail to the end of the file
	// (a truncate, or a collapse/insert shifting the rest). It is kept apart
	// from Data, whose ranges carry in-kernel chunk marks.
	Tail    uint64
	HasTail bool
	// Writeback is set when a range was dirtied through a mapping: the
	// pages must be written back before reading, so the next store faults
	// and is reported again.
	Writeback bool
	// Attr is set when metadata (or, for a directory, its entries) changed.
	Attr bool
	// Rescan asks for the whole file to be compared with the peer: a record
	// about it was lost.
	Rescan bool
	// MaxSeq is the highest record sequence folded in.
	MaxSeq uint64
	// NewSeq is the sequence of the record that reported this inode's
	// allocation, 0 if none: a shadow entry with this number older than
	// that is a different, deleted inode.
	NewSeq uint64
	// NewGen is the generation of that new inode.
	NewGen uint32
	// Gen is the generation the last record reported (HasGen): with the
	// number, it makes the inode's file handle.
	Gen    uint32
	HasGen bool
	// Retries counts how often this change was requeued, and RetryFrom is
	// when it first was, since the last new record about the inode: a
	// change is given up only after both a number of passes and a time,
	// so that a busy machine (passes come quickly, the writer is slow to
	// move i_size) does not give up a write still in progress.
	Retries   int
	RetryFrom time.Time
}

type entry struct {
	File
	preops []preop
}

// Journal folds capture records into per-inode changes. It is not safe for
// concurrent use.
type Journal struct {
	files map[capture.InodeKey]*entry
	// peak is the most files held since files was made: a Go map keeps
	// the room of its peak, which a burst of changed files would hold
	// for as long as the daemon runs (see shrink).
	peak int
}

// shrinkAt is the peak under which the map is not made anew.
const shrinkAt = 4096

// shrink makes the map anew, with only the files it holds, once they are
// an eighth of its peak or fewer.
func (j *Journal) shrink() {
	if j.peak < shrinkAt || len(j.files) > j.peak/8 {
		return
	}
	// Not maps.Clone: it copies the tables as they are, room included.
	m := make(map[capture.InodeKey]*entry, len(j.files))
	maps.Copy(m, j.files)
	j.files, j.peak = m, len(m)
}

// New returns an empty journal.
func New() *Journal {
	return &Journal{files: map[capture.InodeKey]*entry{}}
}

func (j *Journal) get(k capture.InodeKey) *entry {
	e := j.files[k]
	if e == nil {
		e = &entry{File: File{Key: k}}
		j.files[k] = e
		j.peak = max(j.peak, len(j.files))
	}
	return e
}

// Unbounded is the length from which a range means "to the end of file".
const Unbounded = 1 << 40

func (f *File) addSpan(off, end uint64) {
	if end < off || end-off >= Unbounded {
		if !f.HasTail || off < f.Tail {
			f.Tail, f.HasTail = off, true
		}
		return
	}
	f.Data.Add(off, end-off)
}

// Add folds one record in.
func (j *Journal) Add(r *capture.Record, now time.Time) {
	e := j.get(capture.InodeKey{Dev: r.Dev, Ino: r.Ino})
	if r.Seq > e.MaxSeq {
		e.MaxSeq = r.Seq
		// A change not tried yet, folded into one requeued (see
		// Requeue): the count starts again. Records of a long write
		// mostly come between passes, into its requeued entry.
		e.Retries, e.RetryFrom = 0, time.Time{}
		e.Gen, e.HasGen = r.Gen, true
	}
	switch r.Kind {
	case capture.KindData:
		e.addSpan(r.Pos, r.Pos+r.Len)
	case capture.KindMmap:
		e.addSpan(r.Pos, r.Pos+r.Len)
		e.Writeback = true
	case capture.KindAttr:
		e.Attr = true
		// An operation reported before this record has finished.
		kept := e.preops[:0]
		for _, p := range e.preops {
			if p.seq < r.Seq {
				e.addSpan(p.span.Off, p.span.End)
			} else {
				kept = append(kept, p)
			}
		}
		e.preops = kept
	case capture.KindNew:
		e.NewSeq, e.NewGen = r.Seq, r.Gen
	case capture.KindPreop:
		end := r.Pos + r.Len
		if end < r.Pos {
			end = ^uint64(0)
		}
		e.preops = append(e.preops, preop{seq: r.Seq, span: Span{r.Pos, end}, at: now})
	}
}

// MarkRescan asks for a whole-file comparison of k.
func (j *Journal) MarkRescan(k capture.InodeKey) {
	e := j.get(k)
	e.Rescan = true
	e.Attr = true
}

// Take returns every file with something to ship and forgets it; deferred
// ranges whose operation has not completed stay.
func (j *Journal) Take(now time.Time) []File {
	var out []File
	for k, e := range j.files {
		kept := e.preops[:0]
		for _, p := range e.preops {
			if now.Sub(p.at) >= PreopTimeout {
				e.addSpan(p.span.Off, p.span.End)
			} else {
				kept = append(kept, p)
			}
		}
		e.preops = kept
		if e.Attr || e.Rescan || e.NewSeq != 0 || e.HasTail || !e.Data.Empty() {
			out = append(out, e.File)
		}
		if len(e.preops) == 0 {
			delete(j.files, k)
			continue
		}
		e.File = File{Key: k}
	}
	j.shrink()
	return out
}

// DropSettled forgets every change a full read of the files now covers: a
// resync about to read them takes their place. Kept are operations still
// in progress (deferred ranges), changes requeued because their bytes were
// not visible yet, and files written through a shared mapping (they must
// be written back before they are read). It returns what it dropped: the
// kernel's in-flight marks of those changes must be dropped too, or the
// next change of the same inode or chunk emits no record.
func (j *Journal) DropSettled() []File {
	var out []File
	for k, e := range j.files {
		if len(e.preops) == 0 && e.Retries == 0 && !e.Writeback {
			out = append(out, e.File)
			delete(j.files, k)
		}
	}
	j.shrink()
	return out
}

// Held calls fn for every file the journal still holds after a Take or
// a DropSettled (operations in progress, changes requeued, files written
// through a shared mapping), with the ranges of its operations in
// progress. The pass or resync that just took the others must not count
// these as taken (see replica.Primary.holdKept).
func (j *Journal) Held(fn func(f *File, inProgress []Span)) {
	var ops []Span
	for _, e := range j.files {
		ops = ops[:0]
		for _, p := range e.preops {
			ops = append(ops, p.span)
		}
		fn(&e.File, ops)
	}
}

// Pending reports whether anything is waiting, deferred ranges included.
func (j *Journal) Pending() int { return len(j.files) }

// Requeue puts back what could not be shipped yet (a path that moved
// meanwhile, bytes not yet visible); Retries counts how often. A record
// about the inode since f was taken (its MaxSeq is newer) starts the
// count again: what failed is merged with a change not tried yet, and
// must not be given up on the strength of the older one's tries.
func (j *Journal) Requeue(f File) {
	e := j.get(f.Key)
	if e.MaxSeq > f.MaxSeq {
		f.Retries, f.RetryFrom = 0, time.Time{}
	}
	e.Data.AddAll(&f.Data)
	if f.HasTail {
		e.addSpan(f.Tail, ^uint64(0))
	}
	e.Attr = e.Attr || f.Attr
	e.Rescan = e.Rescan || f.Rescan
	e.Writeback = e.Writeback || f.Writeback
	if f.HasGen && (!e.HasGen || f.MaxSeq > e.MaxSeq) {
		e.Gen, e.HasGen = f.Gen, true
	}
	if f.MaxSeq > e.MaxSeq {
		e.MaxSeq = f.MaxSeq
	}
	if f.NewSeq > e.NewSeq {
		e.NewSeq, e.NewGen = f.NewSeq, f.NewGen
	}
	if f.Retries+1 > e.Retries {
		e.Retries = f.Retries + 1
	}
	if !f.RetryFrom.IsZero() && (e.RetryFrom.IsZero() || f.RetryFrom.Before(e.RetryFrom)) {
		e.RetryFrom = f.RetryFrom
	}
}
