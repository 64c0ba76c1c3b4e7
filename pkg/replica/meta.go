package replica

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// Meta is what a node knows of its copy of one directory, persisted in the
// state directory (written to a temporary file, fsynced, renamed): the
// lineage the copy follows and the last point at which it was known to be
// in sync. Resync decides from both nodes' Meta how much to compare.
type Meta struct {
	// Gen is the generation the copy follows: a number drawn each time a
	// node becomes the source (primary) of the directory. A replica takes
	// its source's Gen when a resync into it completes.
	Gen uint64 `json:"gen"`
	// Base (on a source) is the generation of the peer's copy that the
	// source's modification bitmap is relative to: a peer whose copy
	// follows Base needs only the bitmap (and the recent files of a side
	// that crashed); any other copy is compared whole.
	Base uint64 `json:"base"`
	// Source: this node was the source of Gen last and may hold changes
	// its peer never got (a handover with every change on the peer
	// clears it).
	Source bool `json:"source"`
	// Consistent is false while a resync rewrites the copy.
	Consistent bool `json:"consistent"`
	// SyncTime (unix ns): every change this copy got before it is on this
	// node's disk and, for a source, on the peer's. SyncSeq is the batch of
	// that point (a source's or a replica's).
	SyncTime int64  `json:"sync_time"`
	SyncSeq  uint64 `json:"sync_seq"`
	// Running is the unclean-shutdown marker: set while a daemon runs,
	// cleared by a clean stop.
	Running bool `json:"running"`
	// Crashed: the daemon found Running set when it started, and no
	// resync has completed since. A crashed source's bitmap is lost; a
	// crashed replica's last applied changes may be.
	Crashed bool `json:"crashed,omitempty"`
	// Untracked (unix ns, 0: none): changes made to this copy since then
	// may not have been captured (duet was stopped); resyncs compare the
	// files changed since, until one completes. Kept across clean stops
	// so that a second one does not narrow the window to its own time.
	Untracked int64 `json:"untracked,omitempty"`
}

// MetaStore holds one directory's Meta, safe for concurrent use.
type MetaStore struct {
	path string
	mu   sync.Mutex
	m    Meta
}

// OpenMeta loads (or starts) the Meta of directory name in stateDir. A
// Running marker left by a daemon that did not stop cleanly becomes
// Crashed. The marker is set again for this run.
func OpenMeta(stateDir, name string) (*MetaStore, error) {
	s := &MetaStore{path: filepath.Join(stateDir, "copy-"+name+".json")}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("reading %s: %w", s.path, err)
	default:
		if err := json.Unmarshal(b, &s.m); err != nil {
			// A torn or damaged file: forget the lineage, which only
			// costs a full comparison.
			s.m = Meta{}
		}
	}
	if s.m.Running {
		s.m.Crashed = true
	}
	s.m.Running = true
	if err := s.saveLocked(); err != nil {
		return nil, err
	}
	return s, nil
}

// Get returns a copy of the current Meta.
func (s *MetaStore) Get() Meta {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m
}

// Update changes the Meta with f and persists it.
func (s *MetaStore) Update(f func(*Meta)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.m)
	return s.saveLocked()
}

// ClockStepped moves the copy's wall-clock times (its sync point and the
// start of its untracked window) back by d: this host's clock was set
// back by d. A resync that does not trust the bitmap compares the files
// whose ctime is past the sync point less the margin; the files changed
// after such a step carry ctimes up to d before the times recorded
// earlier, and were not compared (a backward NTP step on an edge box
// whose clock ran fast, then a crash).
func (s *MetaStore) ClockStepped(d time.Duration) error {
	return s.Update(func(m *Meta) {
		m.SyncTime = StepBack(m.SyncTime, d)
		m.Untracked = StepBack(m.Untracked, d)
	})
}

// StepBack moves wall-clock time t (unix ns, 0: none) back by d, to no
// earlier than 1 ns (0 would say "none").
func StepBack(t int64, d time.Duration) int64 {
	if t == 0 {
		return 0
	}
	if t <= 1 || d.Nanoseconds() >= t {
		return 1
	}
	return t - d.Nanoseconds()
}

// inReckoning is t's wall-clock time (unix ns) in the clock's reckoning
// now, from its monotonic reading: a time read before the clock was set
// back, recorded after, would be up to the step ahead of the changes
// made since, and ClockStepped may already have moved the recorded
// times back (from two reviews: a pass taken before a step, made
// durable after; a syncfs spanning one). A time without a monotonic
// reading (moved by ClockStepped) is taken as it is.
func inReckoning(t time.Time) int64 { return time.Now().Add(-time.Since(t)).UnixNano() }

func (s *MetaStore) saveLocked() error {
	b, err := json.MarshalIndent(&s.m, "", "  ")
	if err != nil {
		return err
	}
	return writeFileSync(s.path, append(b, '\n'))
}

// writeFileSync replaces path with data durably: temporary file, fsync,
// rename, fsync of the directory.
func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// NewGen draws a generation number (never 0).
func NewGen() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) | 1
}

// welcomeState is the copy state a replica announces.
func (m *Meta) welcomeState() wire.CopyState {
	var st wire.CopyState
	if m.Consistent {
		st |= wire.CopyConsistent
	}
	if m.Source {
		st |= wire.CopySource
	}
	if m.Crashed || m.Source {
		st |= wire.CopyDiverged
	}
	return st
}

// SyncAge is how long ago the copy's last sync point was.
func (m *Meta) SyncAge() time.Duration {
	if m.SyncTime == 0 {
		return 0
	}
	return time.Since(time.Unix(0, m.SyncTime))
}
