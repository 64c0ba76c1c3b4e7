package capture

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestBtrfsForgetEpochStress: writers keep rewriting the same 64 KiB of a
// btrfs file with increasing values while a reader does what the builder
// does (records seen: forget the chunk, then read). At the end, the last
// value written must have been read by a read that followed the last
// record's forget.
func TestBtrfsForgetEpochStress(t *testing.T) {
	c, f, ino := btrfsFile(t)
	rc := newRecorder(c)
	buf := make([]byte, 64<<10)
	f.WriteAt(buf, 0)
	rc.drain()
	var st syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &st)
	key := []CaptureChunkKey{{Dev: KernelDev(st.Dev), Ino: ino, Chunk: 0}}
	const writers = 3
	var seq atomic.Uint64
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, 8)
			for i := 0; !stop.Load(); i++ {
				v := seq.Add(1)
				binary.LittleEndian.PutUint64(b, v)
				// Each writer its own 8 bytes in each 4 KiB block, at
				// a block moving through the 64 KiB.
				off := int64((i%16)*4096 + w*8)
				if _, err := f.WriteAt(b, off); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	read := func() map[int64]uint64 {
		got := map[int64]uint64{}
		b := make([]byte, 64<<10)
		f.ReadAt(b, 0)
		for blk := 0; blk < 16; blk++ {
			for w := 0; w < writers; w++ {
				off := int64(blk*4096 + w*8)
				got[off] = binary.LittleEndian.Uint64(b[off:])
			}
		}
		return got
	}
	var last map[int64]uint64
	deadline := time.Now().Add(5 * time.Second)
	rounds := 0
	for time.Now().Before(deadline) {
		n := 0
		for more := true; more; {
			select {
			case <-rc.ch:
				n++
			default:
				more = false
			}
		}
		if n > 0 || last == nil {
			c.ForgetChunks(key)
			last = read()
			rounds++
		}
	}
	stop.Store(true)
	wg.Wait()
	final := read()
	// The reader goes on while records come.
	for len(rc.drain()) > 0 {
		c.ForgetChunks(key)
		last = read()
		rounds++
	}
	for off, v := range final {
		if last[off] != v {
			t.Errorf("offset %d: %d written last, no record after the last read, which saw %d", off, v, last[off])
		}
	}
	t.Logf("%d rounds, no record after the last read", rounds)
}
