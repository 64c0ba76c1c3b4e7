package nfsd

import (
	"encoding/binary"
	"runtime"
	"testing"
	"time"
)

// TestHugeWriteRecordNotAllocatedUpFront: a WRITE record over the proxy's
// bound streamed to go-nfs, whose XDR decoder allocates the data's claimed
// length before it reads a byte of it; checkArgs only compared that length
// with the record's, which the client also claims. A client that sent a
// WRITE header claiming a 1.5 GiB record (and 64 KiB, what the duplicate
// cache peeks) made the server allocate 1.5 GiB, per connection, without
// even a valid handle. Such a WRITE is now refused.
func TestHugeWriteRecordNotAllocatedUpFront(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	const claim = 3 << 29               // 1.5 GiB of data
	fh := make([]byte, handleLen)       // any handle: go-nfs decodes before it resolves
	head := writeCall(1, fh, 0, 2, nil) // FILE_SYNC, data length 0 for now
	binary.BigEndian.PutUint32(head[len(head)-4:], claim)
	binary.BigEndian.PutUint32(head, uint32(len(head)-4+claim)|lastFragment)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	conn := rawConn(t, addr)
	if _, err := conn.Write(append(head, make([]byte, 64<<10)...)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		runtime.ReadMemStats(&after)
		if after.TotalAlloc-before.TotalAlloc > 256<<20 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 64<<20 {
		t.Errorf("a WRITE header claiming %d MiB (64 KiB sent) made the server allocate %d MiB", claim>>20, grown>>20)
	}
}
