package replica

import (
	"os"
	"sync"

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
// sumWorkers goroutines while the peer is still scanning.
type localSums struct {
	root  *os.File
	local *listing
	next  int // local entries before next are matched or passed
	work  chan int
	wg    sync.WaitGroup
	once  sync.Once
	mu    sync.Mutex
	err   error
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
		if l := s.local.at(s.next); l.path == e.Path && l.mode.IsRegular() && e.Mode.IsRegular() && e.Flags&wire.EntrySummed != 0 {
			s.work <- s.next
			s.next++
		}
	}
}

// wait returns once every file queued is summed, with the first error.
// The local entries are not touched after it returns.
func (s *localSums) wait() error {
	s.once.Do(func() { close(s.work) })
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
