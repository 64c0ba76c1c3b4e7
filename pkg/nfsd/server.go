// Package nfsd serves a replicated directory over NFSv3 with file handles
// that survive a failover. A handle names a random file ID kept in an
// index inside the export itself (indexDir), so the peer's copy of the
// tree — other inode numbers, same paths and contents — resolves every
// handle the old server gave out. See docs/DESIGN.md, "NFS service".
package nfsd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	billy "github.com/go-git/go-billy/v5"
	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"
)

// Handler is go-nfs's view of one export, acting as the server; each
// connection's go-nfs gets a connHandler, which acts as its caller.
type Handler struct {
	fs     *fsys
	ix     *index
	key    handleKey
	verf   *verifier
	squash Squash
	drc    *replyCache
}

var _ nfs.Handler = (*Handler)(nil)

// New opens the export dir and its index, creating the index on first use
// and cutting a torn tail off it. Every change it makes is synced with s.
func New(dir string, s Syncer) (*Handler, error) {
	root, err := fstree.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	ix, err := openIndex(root, s)
	if err != nil {
		root.Close()
		return nil, fmt.Errorf("nfs export %s: %w", dir, err)
	}
	key := handleKey(ix.log.key)
	v := newVerifier()
	fs := &fsys{export: &export{ix: ix, key: key, root: root, sync: v.syncer(s)}}
	return &Handler{fs: fs, ix: ix, key: key, verf: v, drc: newReplyCache()}, nil
}

// Close waits for running calls and releases the export; later calls fail.
func (h *Handler) Close() error { return h.fs.close() }

// mountPoint is a directory of the export mounted on its own (the
// provisioner gives each volume a subdirectory). go-nfs asks only for
// its handle; every other handle resolves against the whole export.
type mountPoint struct {
	*fsys
	prefix []string
}

// Mount accepts the export's root or any directory in it, for every
// client the network lets in (see DESIGN); the calls that follow act as
// their credentials say, AUTH_SYS the only flavor offered.
func (h *Handler) Mount(_ context.Context, _ net.Conn, req nfs.MountRequest) (nfs.MountStatus, billy.Filesystem, []nfs.AuthFlavor) {
	return h.mount(h.fs, req)
}

func (h *Handler) mount(fs *fsys, req nfs.MountRequest) (nfs.MountStatus, billy.Filesystem, []nfs.AuthFlavor) {
	comps, err := split(strings.TrimSuffix(string(req.Dirpath), "/"))
	if err != nil {
		return nfs.MountStatusErrNoEnt, nil, nil
	}
	fi, err := h.fs.Lstat(join(comps))
	switch {
	case err != nil:
		return nfs.MountStatusErrNoEnt, nil, nil
	case !fi.IsDir():
		return nfs.MountStatusErrNotDir, nil, nil
	}
	return nfs.MountStatusOk, &mountPoint{fsys: fs, prefix: comps}, []nfs.AuthFlavor{nfs.AuthFlavorUnix}
}

// Change lets go-nfs set attributes.
func (h *Handler) Change(billy.Filesystem) billy.Change { return h.fs }

// FSStat reports the export's filesystem.
func (h *Handler) FSStat(_ context.Context, _ billy.Filesystem, s *nfs.FSStat) error {
	if err := h.fs.enter(); err != nil {
		return err
	}
	defer h.fs.leave()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(h.fs.root.Fd()), &st); err != nil {
		return err
	}
	bs := uint64(st.Bsize)
	s.TotalSize, s.FreeSize, s.AvailableSize = st.Blocks*bs, st.Bfree*bs, st.Bavail*bs
	s.TotalFiles, s.FreeFiles, s.AvailableFiles = st.Files, st.Ffree, st.Ffree
	return nil
}

// ToHandle returns the handle of path, giving the object a file ID
// (durably) if it has none. go-nfs has no way to fail here: a handle that
// cannot be made is returned empty, which the server refuses when the
// client uses it (STALE, or INVAL for a GETATTR), rather than one that a
// failover could lose.
func (h *Handler) ToHandle(f billy.Filesystem, path []string) []byte {
	if err := h.fs.enter(); err != nil {
		return nil
	}
	defer h.fs.leave()
	comps := path
	if m, ok := f.(*mountPoint); ok {
		comps = append(m.prefix[:len(m.prefix):len(m.prefix)], path...)
	}
	for _, c := range comps {
		if strings.Contains(c, "/") {
			return nil
		}
	}
	id, err := h.fs.idOf(join(comps))
	if err != nil {
		if !errors.Is(err, unix.ENOENT) {
			slog.Warn("nfs: no file ID for a reply; the client gets an empty handle", "path", join(comps), "err", err)
		}
		return nil
	}
	return h.key.handle(id)
}

// FromHandle resolves a handle to its file's path, the last component a
// marker (see markerPrefix). An unknown or removed ID, or a handle not
// made with this export's key, is an error, which go-nfs answers with
// NFS3ERR_STALE.
func (h *Handler) FromHandle(fh []byte) (billy.Filesystem, []string, error) {
	comps, err := h.resolve(fh)
	if err != nil {
		return nil, nil, err
	}
	return h.fs, comps, nil
}

func (h *Handler) resolve(fh []byte) ([]string, error) {
	if err := h.fs.enter(); err != nil {
		return nil, err
	}
	defer h.fs.leave()
	id, err := h.key.id(fh)
	if err != nil {
		return nil, err
	}
	comps, err := h.ix.locate(id)
	if err != nil || len(comps) == 0 {
		return nil, err
	}
	comps[len(comps)-1] = h.fs.marker(id)
	return comps, nil
}

// InvalidateHandle does nothing: an ID follows its file through renames,
// and Remove takes it back itself.
func (h *Handler) InvalidateHandle(billy.Filesystem, []byte) error { return nil }

// connHandler is go-nfs's view of the export for one client connection:
// the filesystem it hands go-nfs acts as the connection's current caller.
type connHandler struct {
	*Handler
	fs *fsys
	p  *proxy
}

func (c *connHandler) Mount(_ context.Context, _ net.Conn, req nfs.MountRequest) (nfs.MountStatus, billy.Filesystem, []nfs.AuthFlavor) {
	return c.mount(c.fs, req)
}

func (c *connHandler) Change(billy.Filesystem) billy.Change { return c.fs }

func (c *connHandler) FromHandle(fh []byte) (billy.Filesystem, []string, error) {
	comps, err := c.resolve(fh)
	if err != nil && !errors.Is(err, errStale) {
		// go-nfs answers STALE to any error, and a client then gives
		// the handle up for good. A failure that says nothing of the
		// handle (this server stopping: its export closed, or its
		// supervisor gone so that its calls fail with ENOSYS; an I/O
		// error) ends the connection instead, unanswered: the client
		// sends the call again, to this server or the next one.
		slog.Warn("nfs: closing a client connection: a handle could not be resolved, for a reason that is not the handle's", "client", c.p.client.RemoteAddr(), "err", err)
		c.p.close()
	}
	if err != nil {
		return nil, nil, err
	}
	return c.fs, comps, nil
}

// HandleLimit is unbounded: handles are not cached. go-nfs uses half of it
// as the most entries of one READDIR reply.
func (h *Handler) HandleLimit() int { return math.MaxInt32 }

// Serve answers NFSv3 and MOUNT (one port for both; no portmapper, no
// NLM) on l for the export dir until ctx ends, each call acting as its
// AUTH_SYS caller squashed as sq says. It then closes l and every
// connection, as a failover does, and returns once no request is using the
// export.
func Serve(ctx context.Context, l net.Listener, dir string, s Syncer, sq Squash) error {
	h, err := New(dir, s)
	if err != nil {
		l.Close()
		return err
	}
	h.squash = sq
	return h.serve(ctx, l)
}

// serve is Serve for an open export; it closes h.
func (h *Handler) serve(ctx context.Context, l net.Listener) error {
	if !server().root {
		slog.Warn("nfs: the server is not root: every call acts as its user, whatever the client's credential", "uid", os.Geteuid())
	}
	routeLogs()
	tl := &tracker{Listener: l, h: h, conns: map[*proxy]struct{}{}}
	stop := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-stop:
		}
		tl.closeAll()
	}()
	err := tl.serve(ctx)
	close(stop)
	tl.closeAll()
	tl.wg.Wait()
	if cerr := h.Close(); err == nil || ctx.Err() != nil {
		err = cerr
	}
	return err
}

// tracker puts a proxy (rpc.go) and a go-nfs server of its own between
// each client and the export, and keeps them so that Serve can close
// them: go-nfs leaves its connections open when its listener closes.
type tracker struct {
	net.Listener
	h      *Handler
	wg     sync.WaitGroup // the proxies' loops and go-nfs's servers
	mu     sync.Mutex
	conns  map[*proxy]struct{}
	closed bool
	// from counts the connections of each client address; refused and
	// refusedAt rate-limit the warning about those over the limits.
	from      map[string]int
	refused   int
	refusedAt time.Time
}

// Connections a server keeps: each costs buffers and goroutines (about
// 200 KiB), and a host of the allowed networks could open them by the
// thousand and send nothing (a review). A Linux client uses one a mount
// (up to 16 with nconnect).
const (
	maxConns        = 256
	maxConnsPerHost = 32
)

// admit counts a new connection from host, or says no when over the
// limits (said in the log at most once a minute).
func (t *tracker) admit(host string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.from == nil {
		t.from = map[string]int{}
	}
	if len(t.conns) >= maxConns || t.from[host] >= maxConnsPerHost {
		t.refused++
		if time.Since(t.refusedAt) >= time.Minute {
			slog.Warn("nfs: client connection refused: too many connections", "client", host, "from_it", t.from[host], "all", len(t.conns),
				"max_per_host", maxConnsPerHost, "max", maxConns, "refused_since_last_warning", t.refused)
			t.refusedAt, t.refused = time.Now(), 0
		}
		return false
	}
	t.from[host]++
	return true
}

// release uncounts a connection of host.
func (t *tracker) release(host string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.from[host]--; t.from[host] <= 0 {
		delete(t.from, host)
	}
}

// serve accepts clients until the listener fails or is closed. Each gets
// a go-nfs server whose handler acts as the client's caller of the
// moment: go-nfs hands its handler nothing of the call but the handle.
func (t *tracker) serve(ctx context.Context) error {
	// go-nfs's verifier goes only in its FILE_SYNC WRITE replies, which
	// no COMMIT follows: the first is enough.
	id := t.h.verf.current()
	for {
		c, err := t.Listener.Accept()
		if err != nil {
			return err
		}
		host := hostOf(c.RemoteAddr())
		if !t.admit(host) {
			c.Close()
			continue
		}
		theirs, ours := net.Pipe()
		p := newProxy(t.h, c, ours)
		srv := &nfs.Server{Handler: &connHandler{Handler: t.h, fs: p.fs, p: p}, Context: ctx, ID: id}
		if !t.add(p) {
			p.close()
			theirs.Close()
			t.release(host)
			return net.ErrClosed
		}
		t.wg.Add(3)
		go func() {
			defer t.wg.Done()
			p.serveClient()
		}()
		go func() {
			defer t.wg.Done()
			// It ends last: once the client hangs up, it still reads
			// go-nfs's replies to the calls passed, and closeAll must
			// find the proxy until then.
			p.serveReplies()
			t.mu.Lock()
			delete(t.conns, p)
			t.mu.Unlock()
			t.release(host)
		}()
		go func() {
			defer t.wg.Done()
			srv.Serve(&oneConn{conn: &pipeConn{Conn: theirs, local: c.LocalAddr(), remote: c.RemoteAddr()}, done: p.closed})
		}()
	}
}

// add keeps p, unless the tracker is closed.
func (t *tracker) add(p *proxy) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.conns[p] = struct{}{}
	return true
}

func (t *tracker) closeAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.closed = true
	t.Listener.Close()
	for p := range t.conns {
		p.close()
	}
}

// oneConn is a listener that gives go-nfs one connection, then nothing
// until done is closed.
type oneConn struct {
	conn  net.Conn
	done  <-chan struct{}
	taken bool // Accept is called from go-nfs's one loop
}

func (l *oneConn) Accept() (net.Conn, error) {
	if !l.taken {
		l.taken = true
		return l.conn, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

// Close does nothing: the proxy closes the connection.
func (l *oneConn) Close() error   { return nil }
func (l *oneConn) Addr() net.Addr { return l.conn.LocalAddr() }

// pipeConn is go-nfs's end of a client's pipe, with the client's
// addresses (go-nfs hands the connection to Mount).
type pipeConn struct {
	net.Conn
	local, remote net.Addr
}

func (c *pipeConn) LocalAddr() net.Addr  { return c.local }
func (c *pipeConn) RemoteAddr() net.Addr { return c.remote }

var routeOnce sync.Once

// routeLogs sends go-nfs's messages to slog at debug level: they are per
// request (a lookup of a missing name is an "error" there), not events an
// operator acts on; the index logs its own.
func routeLogs() {
	routeOnce.Do(func() { nfs.SetLogger(&nfsLog{DefaultLogger: &nfs.DefaultLogger{Level: nfs.ErrorLevel}}) })
}

// nfsLog keeps go-nfs's level handling and panics, and prints through slog.
type nfsLog struct{ *nfs.DefaultLogger }

func (l *nfsLog) debug(msg string) { slog.Debug("go-nfs: " + msg) }

func (l *nfsLog) Error(args ...any)                 { l.debug(fmt.Sprint(args...)) }
func (l *nfsLog) Errorf(format string, args ...any) { l.debug(fmt.Sprintf(format, args...)) }
func (l *nfsLog) Warn(args ...any)                  { l.debug(fmt.Sprint(args...)) }
func (l *nfsLog) Warnf(format string, args ...any)  { l.debug(fmt.Sprintf(format, args...)) }
func (l *nfsLog) Info(args ...any)                  {}
func (l *nfsLog) Infof(string, ...any)              {}
func (l *nfsLog) Print(args ...any)                 { l.debug(fmt.Sprint(args...)) }
func (l *nfsLog) Printf(format string, args ...any) { l.debug(fmt.Sprintf(format, args...)) }
func (l *nfsLog) Debug(...any)                      {}
func (l *nfsLog) Debugf(string, ...any)             {}
func (l *nfsLog) Trace(...any)                      {}
func (l *nfsLog) Tracef(string, ...any)             {}
