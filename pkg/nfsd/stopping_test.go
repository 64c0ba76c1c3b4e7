package nfsd

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

// TestUnresolvedForAnotherReasonNotStale: go-nfs answers STALE to any
// failure of FromHandle, and a client then gives the handle up for good.
// A server whose export is closing, or whose supervisor died (its calls
// then fail with ENOSYS: seen in the fault campaign, when a daemon was
// killed during a swap and its NFS server answered STALE for 0.4 s until
// it was killed too), must end the connection unanswered instead, so that
// the client sends the call again to the next server. A handle that names
// nothing any more is still STALE, on a connection that stays.
func TestUnresolvedForAnotherReasonNotStale(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "vol"), 0o755); err != nil {
		t.Fatal(err)
	}
	h, err := New(dir, Fsync{})
	if err != nil {
		t.Fatal(err)
	}
	conn := func() (*connHandler, *proxy) {
		client, _ := net.Pipe()
		_, nfsd := net.Pipe()
		p := newProxy(h, client, nfsd)
		t.Cleanup(p.close)
		return &connHandler{Handler: h, fs: p.fs, p: p}, p
	}
	closed := func(p *proxy) bool {
		select {
		case <-p.closed:
			return true
		default:
			return false
		}
	}
	vol := h.ToHandle(h.fs, []string{"vol"})
	if len(vol) == 0 {
		t.Fatal("no handle for vol")
	}
	c, p := conn()
	if _, _, err := c.FromHandle(vol); err != nil || closed(p) {
		t.Fatalf("a live handle: %v, connection closed %v", err, closed(p))
	}
	if err := os.Remove(filepath.Join(dir, "vol")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.FromHandle(vol); err == nil || closed(p) {
		t.Errorf("the handle of a removed directory: %v, connection closed %v; want STALE on a connection that stays", err, closed(p))
	}
	c, p = conn()
	h.Close() // the server stops
	if _, _, err := c.FromHandle(vol); err == nil || !closed(p) {
		t.Errorf("a handle on a closed export: %v, connection closed %v; want the connection ended unanswered", err, closed(p))
	}
}
