package nfsd

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestPaddedReadCountCut (a review, forty-second session; failed on
// 7f8fbb8): the proxy cut a READ's count to maxRead only when the call
// record was at most maxReadCall (1024) bytes; a larger READ record was
// passed to go-nfs as it was. A client that padded its READ with trailing
// bytes (go-nfs ignores them) got go-nfs's own cap (nfs.MaxRead, 16 MiB)
// instead, each such call pinning 16 MiB while the client left the reply
// unread: the bound TestStalledReadHoldsMemory relies on was gone.
func TestPaddedReadCountCut(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "big")
	mustOK(t, "SETATTR size", c.truncate(f, 16<<20))

	conn := rawConn(t, addr)
	rec := readCall(7, f, 0, 16<<20)
	rec = append(rec, make([]byte, 1100)...) // trailing bytes: go-nfs ignores them
	binary.BigEndian.PutUint32(rec, uint32(len(rec)-4)|lastFragment)
	if _, err := conn.Write(rec); err != nil {
		t.Fatal(err)
	}
	body := replyBody(t, conn)
	if len(body) < 28 || binary.BigEndian.Uint32(body[24:]) != 0 {
		t.Fatalf("READ: reply %x…, want OK", body[:min(len(body), 32)])
	}
	// READ3resok: post_op_attr (true + fattr3 of 84 bytes), count, eof, data.
	count := binary.BigEndian.Uint32(body[28+4+84:])
	t.Logf("a READ of 16 MiB in a %d-byte record: %d bytes returned (%d-byte reply)", len(rec)-4, count, len(body))
	if count > maxRead {
		t.Errorf("a READ record padded to %d bytes got %d bytes (%d MiB) in one reply: the cut to maxRead (%d MiB, what FSINFO tells as rtmax) was skipped", len(rec)-4, count, count>>20, maxRead>>20)
	}
}

// TestReaddirCountsCut (the same review): READDIRPLUS's dircount and
// maxcount were passed to go-nfs as the client sent them (up to 4 GiB),
// and go-nfs builds the whole reply in memory: a client that asked for
// everything of a large directory and left the reply unread pinned tens of
// MiB a call. They are cut to maxRead, as a READ's count is: the reply
// holds at most that, and the listing goes on at its cookie.
func TestReaddirCountsCut(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big")
	if err := os.Mkdir(big, 0o755); err != nil {
		t.Fatal(err)
	}
	const files = 12000
	for i := range files {
		f, err := os.Create(filepath.Join(big, fmt.Sprintf("file-with-a-longish-name-%06d", i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	d, st := c.lookup(c.mount("/"), "big")
	mustOK(t, "LOOKUP big", st)
	conn := rawConn(t, addr)
	conn.SetDeadline(time.Now().Add(time.Minute))
	args := append(xdrOpaque(d), make([]byte, 8+8)...) // cookie 0, cookieverf 0
	body, st := exchangeOn(t, conn, rpcCall(9, procReaddirP, append(args, u32s(^uint32(0), ^uint32(0))...)))
	if st != 0 {
		t.Fatalf("READDIRPLUS: status %d", st)
	}
	t.Logf("READDIRPLUS of a %d-entry directory asking for 4 GiB: a %d-byte reply", files, len(body))
	if len(body) > maxRead+4096 {
		t.Errorf("a READDIRPLUS asking for 4 GiB got a %d-byte reply: its counts were not cut to maxRead (%d)", len(body), maxRead)
	}
}
