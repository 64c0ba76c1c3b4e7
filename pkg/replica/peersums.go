package replica

import (
	"os"
	"sync"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
)

// sumsAhead bounds the entries a manifest's walk lists ahead of the
// oldest one still being summed.
const sumsAhead = 64

// orderedSums checksums the files of a manifest's walk with sumWorkers
// goroutines and hands every entry to fn in the walk's order, from a
// goroutine of its own. The walk summed them one after the other: after a
// clean restart of both nodes, the replica's sums of the files changed in
// the window were the resync's longest step (3.2 s for 1 GiB against 1.6
// s for rsync's whole run; the primary sums its own copies with
// sumWorkers meanwhile).
type orderedSums struct {
	root    *os.File
	fn      func(*wire.Entry) error
	order   chan *sumItem // every entry, in the walk's order
	work    chan *sumItem // the entries to sum
	stopped chan struct{} // closed at the first error
	once    sync.Once
	err     error // the first error (read after stopped is closed)
	workers sync.WaitGroup
	emitted chan struct{} // closed when the emitter returns
}

type sumItem struct {
	e    wire.Entry
	done chan error // nil: not summed
}

func newOrderedSums(root *os.File, fn func(*wire.Entry) error) *orderedSums {
	s := &orderedSums{root: root, fn: fn, order: make(chan *sumItem, sumsAhead), work: make(chan *sumItem, sumsAhead),
		stopped: make(chan struct{}), emitted: make(chan struct{})}
	for range sumWorkers {
		s.workers.Add(1)
		go func() {
			defer s.workers.Done()
			for it := range s.work {
				var err error
				select {
				case <-s.stopped:
				default:
					err = fstree.SumEntry(s.root, &it.e)
				}
				it.done <- err
			}
		}()
	}
	go s.emit()
	return s
}

func (s *orderedSums) fail(err error) {
	s.once.Do(func() {
		s.err = err
		close(s.stopped)
	})
}

// emit hands the entries to fn in order, each once its sums are done.
func (s *orderedSums) emit() {
	defer close(s.emitted)
	for it := range s.order {
		select {
		case <-s.stopped:
			continue // drained
		default:
		}
		if it.done != nil {
			if err := <-it.done; err != nil {
				s.fail(err)
				continue
			}
		}
		if err := s.fn(&it.e); err != nil {
			s.fail(err)
		}
	}
}

// add queues a copy of e, summed first if sum is set. It returns the
// first error of the sums or of fn, which ends the walk.
func (s *orderedSums) add(e *wire.Entry, sum bool) error {
	it := &sumItem{e: *e}
	if sum {
		it.done = make(chan error, 1)
		select {
		case s.work <- it:
		case <-s.stopped:
			return s.err
		}
	}
	select {
	case s.order <- it:
		return nil
	case <-s.stopped:
		return s.err
	}
}

// close waits for every entry queued to be summed and handed to fn, and
// returns the first error.
func (s *orderedSums) close() error {
	close(s.work)
	close(s.order)
	<-s.emitted
	s.workers.Wait()
	select {
	case <-s.stopped:
		return s.err
	default:
		return nil
	}
}
