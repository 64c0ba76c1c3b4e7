package nfsd

import (
	"context"
	"math"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// client is an nfsclient.Client for these tests: NFS statuses come back
// as numbers, which the assertions compare, and a call that gets no reply
// within callTimeout fails the test. Its dialer follows point, as a
// client behind a VIP follows the service to another server.
type client struct {
	t    testing.TB
	c    *nfsclient.Client
	addr atomic.Pointer[string]
}

// callTimeout bounds one call, retries included.
const callTimeout = 10 * time.Second

// noReply is the status of a call that failed without an NFS status: it
// matches no status an assertion expects.
const noReply = math.MaxUint32

func dialNFS(t testing.TB, addr string) *client {
	c := &client{t: t}
	c.point(addr)
	c.c = nfsclient.New(func(ctx context.Context) (net.Conn, error) {
		return nfsclient.DialReserved(ctx, net.Dialer{}, "tcp", *c.addr.Load())
	})
	t.Cleanup(func() { c.c.Close() })
	return c
}

// dialTCP connects to addr from a privileged port, as a Linux mount
// does: the server refuses calls from others (Squash.Insecure).
func dialTCP(addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return nfsclient.DialReserved(ctx, net.Dialer{}, "tcp", addr)
}

// point sends the client's next connection to addr; the current one
// breaks when its server stops.
func (c *client) point(addr string) { c.addr.Store(&addr) }

// call runs f with callTimeout and returns its result and NFS status. It
// reports other errors with Errorf, not Fatalf: workers call it from
// their own goroutines.
func call[T any](c *client, f func(ctx context.Context) (T, error)) (T, uint32) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	v, err := f(ctx)
	if err == nil {
		return v, nfsclient.StatusOK
	}
	if st, ok := nfsclient.StatusOf(err); ok {
		return v, st
	}
	c.t.Errorf("%v", err)
	return v, noReply
}

// status is call for a procedure that returns only an error.
func (c *client) status(f func(ctx context.Context) error) uint32 {
	c.t.Helper()
	_, st := call(c, func(ctx context.Context) (struct{}, error) { return struct{}{}, f(ctx) })
	return st
}

func (c *client) mount(path string) []byte {
	c.t.Helper()
	fh, st := c.tryMount(path)
	if st != nfsclient.StatusOK {
		c.t.Fatalf("mount %s: status %d", path, st)
	}
	return fh
}

func (c *client) tryMount(path string) ([]byte, uint32) {
	return call(c, func(ctx context.Context) ([]byte, error) { return c.c.Mount(ctx, path) })
}

func (c *client) getattr(fh []byte) (nfsclient.Attr, uint32) {
	return call(c, func(ctx context.Context) (nfsclient.Attr, error) { return c.c.Getattr(ctx, fh) })
}

func (c *client) access(fh []byte, mask uint32) (uint32, uint32) {
	return call(c, func(ctx context.Context) (uint32, error) { return c.c.Access(ctx, fh, mask) })
}

func (c *client) readlink(fh []byte) (string, uint32) {
	return call(c, func(ctx context.Context) (string, error) { return c.c.Readlink(ctx, fh) })
}

func (c *client) fsstat(fh []byte) uint32 {
	_, st := call(c, func(ctx context.Context) (nfsclient.FSStat, error) { return c.c.Fsstat(ctx, fh) })
	return st
}

func (c *client) truncate(fh []byte, size uint64) uint32 {
	return c.status(func(ctx context.Context) error { return c.c.Setattr(ctx, fh, nfsclient.SetAttr{Size: &size}) })
}

func (c *client) lookup(dir []byte, name string) ([]byte, uint32) {
	return call(c, func(ctx context.Context) ([]byte, error) { return c.c.Lookup(ctx, dir, name) })
}

func (c *client) read(fh []byte, off uint64, n uint32) ([]byte, uint32) {
	return call(c, func(ctx context.Context) ([]byte, error) {
		b, _, err := c.c.Read(ctx, fh, off, n)
		return b, err
	})
}

// write returns the stability level the server answered; a short write
// fails the test.
func (c *client) write(fh []byte, off uint64, data []byte, stable nfsclient.Stable) (nfsclient.Stable, uint32) {
	c.t.Helper()
	r, st := call(c, func(ctx context.Context) (nfsclient.WriteResult, error) {
		return c.c.Write(ctx, fh, off, data, stable)
	})
	if st == nfsclient.StatusOK && r.Count != uint32(len(data)) {
		c.t.Errorf("WRITE: %d of %d bytes", r.Count, len(data))
		return 0, noReply
	}
	return r.Committed, st
}

func (c *client) commit(fh []byte) uint32 {
	_, st := call(c, func(ctx context.Context) (uint64, error) { return c.c.Commit(ctx, fh) })
	return st
}

func (c *client) create(dir []byte, name string) ([]byte, uint32) {
	return call(c, func(ctx context.Context) ([]byte, error) {
		return c.c.Create(ctx, dir, name, nfsclient.Unchecked, 0o644)
	})
}

func (c *client) mkdir(dir []byte, name string) ([]byte, uint32) {
	return call(c, func(ctx context.Context) ([]byte, error) { return c.c.Mkdir(ctx, dir, name, 0o755) })
}

func (c *client) symlink(dir []byte, name, target string) ([]byte, uint32) {
	return call(c, func(ctx context.Context) ([]byte, error) { return c.c.Symlink(ctx, dir, name, target) })
}

func (c *client) remove(dir []byte, name string) uint32 {
	return c.status(func(ctx context.Context) error { return c.c.Remove(ctx, dir, name) })
}

func (c *client) rename(fromDir []byte, from string, toDir []byte, to string) uint32 {
	return c.status(func(ctx context.Context) error { return c.c.Rename(ctx, fromDir, from, toDir, to) })
}

func (c *client) readdirplus(dir []byte) ([]nfsclient.DirEntry, uint32) {
	return call(c, func(ctx context.Context) ([]nfsclient.DirEntry, error) { return c.c.ReadDirPlus(ctx, dir) })
}
