package nfsd

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
	nfs "github.com/willscott/go-nfs"
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

// TestFSInfoToldSizesAreServed: FSINFO tells a client the largest READ
// and WRITE the server takes. go-nfs told 1 GiB for both, while a WRITE
// over 4 MiB is refused (GARBAGE_ARGS): a client that took the figure at
// its word (Linux caps it at 1 MiB; others need not) had every large
// write fail. The told wtmax must be served, stable or not, and a stale
// handle answered STALE.
func TestFSInfoToldSizesAreServed(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	f := newFile(t, c, "f")
	conn := rawConn(t, addr)
	if _, err := conn.Write(rpcCall(1, procFSInfo, xdrOpaque(root))); err != nil {
		t.Fatal(err)
	}
	_, accept, res := reply(t, conn)
	if accept != 0 || len(res) < 8 || binary.BigEndian.Uint32(res) != nfsclient.StatusOK {
		t.Fatalf("FSINFO: accept state %d, results %x", accept, res)
	}
	res = res[4:]
	if binary.BigEndian.Uint32(res) == 1 {
		res = res[4+84:] // the root's attributes (fattr3)
	} else {
		res = res[4:]
	}
	if len(res) < 7*4+8+8+4 {
		t.Fatalf("FSINFO results of %d bytes after the attributes", len(res))
	}
	rtmax, wtmax, wtpref := binary.BigEndian.Uint32(res), binary.BigEndian.Uint32(res[12:]), binary.BigEndian.Uint32(res[16:])
	t.Logf("rtmax %d, wtmax %d, wtpref %d", rtmax, wtmax, wtpref)
	if rtmax == 0 || rtmax > nfs.MaxRead {
		t.Errorf("FSINFO rtmax %d: a READ is cut at %d", rtmax, nfs.MaxRead)
	}
	if wtmax == 0 || wtpref == 0 || wtpref > wtmax {
		t.Fatalf("FSINFO wtmax %d, wtpref %d", wtmax, wtpref)
	}
	if wtmax > 64<<20 {
		t.Fatalf("FSINFO tells WRITEs of %d MiB are served; the server refuses those over %d MiB", wtmax>>20, (maxIntercepted-4096)>>20)
	}
	data := bytes.Repeat([]byte{'w'}, int(wtmax))
	for i, stable := range []uint32{uint32(nfsclient.Unstable), uint32(nfsclient.FileSync)} {
		xid := uint32(10 + i)
		if _, err := conn.Write(writeCall(xid, f, 0, stable, data)); err != nil {
			t.Fatal(err)
		}
		got, accept, res := reply(t, conn)
		if got != xid || accept != 0 || binary.BigEndian.Uint32(res) != nfsclient.StatusOK {
			t.Fatalf("a WRITE (stable %d) of the told wtmax, %d bytes: XID %d, accept state %d, results %.40x", stable, wtmax, got, accept, res)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, "f")); err != nil || fi.Size() != int64(wtmax) {
		t.Fatalf("after WRITEs of %d bytes: %v %v", wtmax, fi, err)
	}
	// A handle of nothing is STALE, with no attributes.
	if _, err := conn.Write(rpcCall(2, procFSInfo, xdrOpaque(make([]byte, handleLen)))); err != nil {
		t.Fatal(err)
	}
	if _, accept, res := reply(t, conn); accept != 0 || len(res) != 8 || binary.BigEndian.Uint32(res) != nfsclient.StatusStale {
		t.Errorf("FSINFO of a stale handle: accept state %d, results %x", accept, res)
	}
}
