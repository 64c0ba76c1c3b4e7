package nfsd

import (
	"encoding/binary"
	"runtime"
	"testing"
)

// TestArgumentLengthsBounded: go-nfs allocates whatever length an
// argument claims before reading it. Calls whose names, handles or data
// claim more than the protocol allows or the record holds get
// GARBAGE_ARGS from the proxy, go-nfs never sees them, and the
// connection serves on. Before, a 60-byte LOOKUP claiming a 1 GiB name
// made the server allocate 1 GiB.
func TestArgumentLengthsBounded(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	dir := c.mount("/")
	claim := func(n uint32) []byte { return u32s(n, 0) } // a length, then too little
	mount := func(xid uint32, args []byte) []byte {
		return callRecord(xid, progMount, mountVersion, 1, rootCred, args)
	}
	bigWrite := writeCall(0, f, 0, 2, make([]byte, maxIntercepted))
	binary.BigEndian.PutUint32(bigWrite[4:], 6)
	// The data's length field: after the header, the handle, offset, count, stable.
	at := 4 + 6*4 + len(rootCred) + 8 + 4 + len(f) + (4-len(f)%4)%4 + 16
	binary.BigEndian.PutUint32(bigWrite[at:], 1<<30)
	for _, tc := range []struct {
		name   string
		xid    uint32
		record []byte
	}{
		{"LOOKUP claiming a 1 GiB name", 1, rpcCall(1, 3, append(xdrOpaque(dir), claim(1<<30)...))},
		{"LOOKUP with a 300-byte name", 2, rpcCall(2, 3, append(xdrOpaque(dir), xdrOpaque(make([]byte, 300))...))},
		{"GETATTR claiming a 1 GiB handle", 3, rpcCall(3, 1, claim(1<<30))},
		{"RENAME claiming a 1 GiB second name", 4, rpcCall(4, 14, append(append(append(xdrOpaque(dir), xdrOpaque([]byte("a"))...), xdrOpaque(dir)...), claim(1<<30)...))},
		{"MNT claiming a 1 GiB path", 5, mount(5, claim(1<<30))},
		{"a FILE_SYNC WRITE over the proxy's bound claiming 1 GiB of data", 6, bigWrite},
	} {
		conn := rawConn(t, addr)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		if _, err := conn.Write(tc.record); err != nil {
			t.Fatal(err)
		}
		xid, accept, _ := reply(t, conn)
		runtime.ReadMemStats(&after)
		if xid != tc.xid || accept != garbageArgs {
			t.Errorf("%s: XID %d, accept state %d; want %d, GARBAGE_ARGS (%d)", tc.name, xid, accept, tc.xid, garbageArgs)
		}
		if grown := after.TotalAlloc - before.TotalAlloc; grown > 64<<20 {
			t.Errorf("%s: the server allocated %d MiB for it", tc.name, grown>>20)
		}
		// The connection serves on.
		if _, err := conn.Write(readCall(9, f, 0, 10)); err != nil {
			t.Fatal(err)
		}
		if xid, accept, _ := reply(t, conn); xid != 9 || accept != 0 {
			t.Errorf("%s: the READ after it: XID %d, accept state %d; want 9, SUCCESS", tc.name, xid, accept)
		}
	}
}
