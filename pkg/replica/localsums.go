package replica

import (
	"os"
	"sync"
	"sync/atomic"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
)

// sumWorkers is how many files a full comparison checksums at once: enough
// to keep a disk's queue busy and every core hashing.
const sumWorkers = 4

// localSums checksums, during a full comparison, the local files whose
// peer copy the manifest lists with checksums: only those are compared
// block by block. The others are sent whole (an initial sync sends every
// file), and summing them too read every byte twice. Files are matched as
// the manifest streams in, both sides listing in Scan order, and summed by
// sumWorkers goroutines while the peer is still scanning. A resync that
// compares only the files changed since a cutoff has those files summed
// instead (feedRecent), while the peer walks and sums its copies.
type localSums struct {
	root  *os.File
	local *listing
	next  int // local entries before next are matched or passed
	work  chan int
	// feeding: feedRecent's goroutine runs; stop (abandon) ends it and
	// has the workers pass over what is queued.
	feeding sync.WaitGroup
	stop    atomic.Bool
	wg      sync.WaitGroup
	once    sync.Once
	mu      sync.Mutex
	err     error
}

func newLocalSums(root *os.File, local *listing) *localSums {
	s := &localSums{root: root, local: local, work: make(chan int, 1024)}
	for range sumWorkers {
		s.wg.Add(1)
		go s.worker()
	}
	return s
}

func (s *localSums) worker() {
	defer s.wg.Done()
	for i := range s.work {
		if s.stop.Load() {
			continue
		}
		if err := s.local.at(i).sum(s.root); err != nil {
			s.mu.Lock()
			if s.err == nil {
				s.err = err
			}
			s.mu.Unlock()
		}
	}
}

// match queues the local counterparts of the next entries of the peer's
// manifest. A file it misses (the peer lists in another order) is summed
// by treeSync.sumMatched before the comparison.
func (s *localSums) match(peer []wire.Entry) {
	for k := range peer {
		e := &peer[k]
		for s.next < s.local.len() && fstree.ComparePaths(s.local.at(s.next).path, e.Path) < 0 {
			s.next++
		}
		if s.next == s.local.len() {
			return
		}
		// A comparison of every file asks for 64 KiB blocks: a peer's
		// other ones cannot be compared with this side's (the file is
		// sent whole), and reading it to sum would be wasted.
		if l := s.local.at(s.next); l.path == e.Path && l.mode.IsRegular() && e.Mode.IsRegular() && e.Flags&wire.EntrySummed != 0 && e.SumShift() == wire.BlockShift {
			s.work <- s.next
			s.next++
		}
	}
}

// feedRecent has the regular files flagged recent (markRecent) summed,
// queued from a goroutine of its own: the caller reads the peer's
// manifest meanwhile, and touches no local entry until wait returns.
func (s *localSums) feedRecent() {
	s.feeding.Add(1)
	go func() {
		defer s.feeding.Done()
		for i := range s.local.len() {
			if s.stop.Load() {
				return
			}
			if l := s.local.at(i); l.mode.IsRegular() && l.flags&wire.EntryRecent != 0 {
				s.work <- i
			}
		}
	}()
}

// abandon ends the summing early (the comparison failed): nothing more is
// queued, what is queued is passed over, and it returns once the files
// being read are done.
func (s *localSums) abandon() {
	s.stop.Store(true)
	s.wait()
}

// wait returns once every file queued is summed, with the first error.
// The local entries are not touched after it returns.
func (s *localSums) wait() error {
	s.feeding.Wait()
	s.once.Do(func() { close(s.work) })
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
