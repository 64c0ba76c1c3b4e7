package node

import (
	"encoding/json"
	"fmt"
	"net"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/stack"
	"golang.org/x/sys/unix"
)

// What `duet status` shows, and how the CLI asks for it.

// Status is what `duet status` shows.
type Status struct {
	Node      string               `json:"node"`
	Role      string               `json:"role"` // configured preference
	State     string               `json:"state"`
	Epoch     uint64               `json:"epoch"`
	Stale     bool                 `json:"stale"`
	Version   string               `json:"version"`
	Listen    string               `json:"listen"`
	Peer      string               `json:"peer"`
	PeerState PeerStatus           `json:"peer_state"`
	VIP       *VIPStatus           `json:"vip,omitempty"`
	Services  []stack.Status       `json:"services,omitempty"`
	Hooks     []capture.HookStatus `json:"hooks,omitempty"`
	Capture   *capture.Counters    `json:"capture,omitempty"`
	// MarksAudited counts the audits of the capture's marks that found
	// the capture quiet and judged its marks, since the daemon started
	// (auditMarks; the stuck ones found are per directory, StuckMarks).
	MarksAudited uint64  `json:"capture_marks_audited"`
	RingBytes    int     `json:"ring_buffered_bytes"`
	LagMs        float64 `json:"lag_ms"`
	LagBytes     int     `json:"lag_bytes"`
	// LagHistogram counts acknowledged batches by replication lag, and
	// BarrierHistogram durability calls by time waited, since start.
	LagHistogram     Histogram `json:"lag_histogram"`
	BarrierHistogram Histogram `json:"barrier_histogram"`
	// BarriersWaiting durability calls wait for the peer now, the
	// oldest for BarrierOldestWaitMs.
	BarriersWaiting     int              `json:"barriers_waiting"`
	BarrierOldestWaitMs float64          `json:"barrier_oldest_wait_ms"`
	Dirs                []replica.Status `json:"dirs,omitempty"`
	Replicas            []ReplicaStatus  `json:"replicas,omitempty"`
	// Copies is what this node knows of its copy of each directory.
	Copies []CopyStatus `json:"copies,omitempty"`
	InSync bool         `json:"in_sync"`
	// Latency counts the stages of durability calls since start
	// (duet status --latency).
	Latency []latency.StageCounts `json:"latency,omitempty"`
	// Module is the configured module; EventHook the last peer_lost,
	// peer_lost_check or peer_back command and how it went; LostPeer
	// where the hooks stand with a lost peer (not confirmed down yet,
	// or peer_lost run and peer_back owed).
	Module    string `json:"module,omitempty"`
	EventHook string `json:"event_hook,omitempty"`
	LostPeer  string `json:"lost_peer,omitempty"`
	// HandedOver: this node gave the role away and has not heard the
	// peer serve since: it takes nothing over on its own.
	HandedOver bool `json:"handed_over,omitempty"`
	// ServiceFailed: this node gave the role up because a service failed
	// here, and has not served since: the peer keeps the role when its
	// service fails too, and failback does not come here.
	ServiceFailed bool `json:"service_failed_here,omitempty"`
	// ServiceDown: why a service failed here while this node kept the
	// role (no peer could take it): it moves once one can.
	ServiceDown string `json:"service_down_kept_role,omitempty"`
	// WaitingForPeer says why this node, WAIT, takes nothing over on its
	// own: its start wait (cluster.start_wait), or a stopped peer holding
	// a newer copy.
	WaitingForPeer string `json:"waiting_for_peer,omitempty"`
}

// CopyStatus is one directory's copy on this node (see replica.Meta).
type CopyStatus struct {
	Dir        string `json:"dir"`
	Gen        string `json:"gen"`
	Source     bool   `json:"source"`
	Consistent bool   `json:"consistent"`
	Crashed    bool   `json:"crashed"`
	SyncPoint  string `json:"sync_point,omitempty"`
	SyncSeq    uint64 `json:"sync_seq"`
	// FreeBytes and SizeBytes are the directory's filesystem's space
	// available to unprivileged writers and its size (0, 0: unknown). A
	// full disk stops writers on the primary and the applying on the
	// secondary; behind kine it loses acknowledged puts (README).
	FreeBytes uint64 `json:"free_bytes"`
	SizeBytes uint64 `json:"size_bytes"`
	// DiskFailed: the probe of the directory's filesystem failed while
	// this node served, and why (the role went to the peer if it was in
	// sync).
	DiskFailed string `json:"disk_failed,omitempty"`
}

// PeerStatus is what the heartbeats say of the peer.
type PeerStatus struct {
	Seen          bool    `json:"seen"`
	Name          string  `json:"name,omitempty"`
	State         string  `json:"state,omitempty"`
	Epoch         uint64  `json:"epoch"`
	LastHeartbeat float64 `json:"last_heartbeat_ms_ago,omitempty"`
	Heartbeats    uint64  `json:"heartbeats_received"`
	Refused       uint64  `json:"heartbeats_refused"`
	Lost          uint64  `json:"times_lost"`
	// ServiceFailed: the peer gave the role up because a service failed
	// there: a service failing here keeps the role (cluster.Machine).
	ServiceFailed bool `json:"service_failed,omitempty"`
}

// VIPStatus says where the virtual IP is.
type VIPStatus struct {
	Address   string `json:"address"`
	Interface string `json:"interface"`
	Held      bool   `json:"held_here"`
	Error     string `json:"error,omitempty"`
}

// ReplicaStatus is a secondary directory's state.
type ReplicaStatus struct {
	Dir        string  `json:"dir"`
	Path       string  `json:"path"`
	Connected  bool    `json:"connected"`
	Peer       string  `json:"peer,omitempty"`
	Batches    uint64  `json:"batches_applied"`
	Ops        uint64  `json:"ops_applied"`
	LastSeq    uint64  `json:"last_seq"`
	LastUpdate string  `json:"last_update,omitempty"`
	LastError  string  `json:"last_error,omitempty"`
	ApplyAvgMs float64 `json:"apply_avg_ms"`
	Syncs      uint64  `json:"syncs"`
	SyncAvgMs  float64 `json:"sync_avg_ms"`
}

// Status collects the daemon's state.
func (n *Node) Status() Status {
	m := n.machine.Load()
	s := Status{Node: n.cfg.Node, Role: n.cfg.Role, State: m.State.String(), Epoch: m.Epoch, Stale: m.Stale, HandedOver: m.HandedOver, ServiceFailed: m.ServiceFailed, ServiceDown: m.ServiceDown, WaitingForPeer: n.waitingForPeer(),
		Version: Version, Listen: n.cfg.Listen, Peer: n.cfg.Peer}
	s.PeerState = PeerStatus{Seen: m.Peer.Seen, Name: m.Peer.Name, Epoch: m.Peer.Epoch, ServiceFailed: m.Peer.ServiceFailed,
		Heartbeats: n.heartbeats.Load(), Refused: n.badHeartbeats.Load(), Lost: n.missed.Load()}
	if m.Peer.Name != "" {
		s.PeerState.State = m.Peer.State.String()
	}
	if t := n.lastHeartbeat.Load(); t != 0 {
		s.PeerState.LastHeartbeat = float64(bootSince(t).Microseconds()) / 1000
	}
	if n.vip != nil {
		vs := &VIPStatus{Address: n.vip.Prefix.String(), Interface: n.vip.Iface}
		held, err := n.vip.Held()
		vs.Held = held
		if err != nil {
			vs.Error = err.Error()
		}
		s.VIP = vs
	}
	s.Services = n.stack.Status()
	s.LagHistogram, s.BarrierHistogram = snapshot(n.metrics.lags), snapshot(n.metrics.barriers)
	waiting, oldest := n.waiting.oldest(time.Now())
	s.BarriersWaiting, s.BarrierOldestWaitMs = waiting, float64(oldest.Microseconds())/1000
	n.smu.RLock()
	c, primaries := n.cap, n.primaries
	n.smu.RUnlock()
	s.Latency = n.stages.Snapshot()
	s.MarksAudited = n.marksAudited.Load()
	s.InSync = m.State == cluster.Second || m.State == cluster.Prim && m.Peer.State == cluster.Second
	if c != nil {
		s.Hooks = c.Hooks()
		if ctr, err := c.Counters(); err == nil {
			s.Capture = &ctr
		}
		s.RingBytes = c.Buffered()
		if s.RingBytes > 0 {
			s.InSync = false
		}
	}
	for i, p := range primaries {
		ps := p.Status()
		ps.Mode = n.cfg.Replicate[i].Mode
		ps.MaxLagMs = float64(n.cfg.Replicate[i].MaxLag.Milliseconds())
		s.InSync = s.InSync && ps.InSync
		s.LagMs = max(s.LagMs, ps.LagMs)
		s.LagBytes += ps.UnackedBytes
		s.Dirs = append(s.Dirs, ps)
	}
	for i, d := range n.dirs {
		mt := n.metas[i].Get()
		cs := CopyStatus{Dir: d.Name, Gen: fmt.Sprintf("%016x", mt.Gen), Source: mt.Source, Consistent: mt.Consistent,
			Crashed: mt.Crashed, SyncSeq: mt.SyncSeq, DiskFailed: n.failedDisk(d.Name)}
		if mt.SyncTime != 0 {
			cs.SyncPoint = time.Unix(0, mt.SyncTime).UTC().Format(time.RFC3339Nano)
		}
		var fs unix.Statfs_t
		if err := unix.Statfs(d.Path, &fs); err == nil {
			unit := uint64(fs.Frsize) // the counts' unit (f_frsize)
			if unit == 0 {
				unit = uint64(fs.Bsize)
			}
			cs.FreeBytes, cs.SizeBytes = fs.Bavail*unit, fs.Blocks*unit
		}
		s.Copies = append(s.Copies, cs)
	}
	s.Module = n.cfg.Module
	s.EventHook, s.LostPeer = n.hooks.status()
	if !m.State.Serving() {
		for _, d := range n.cfg.Replicate {
			st := n.server.Stats(d.Name)
			rs := ReplicaStatus{Dir: d.Name, Path: d.Path, Connected: st.Connected.Load(),
				Peer: st.Peer.Load().(string), Batches: st.Batches.Load(), Ops: st.Ops.Load(),
				LastSeq: st.Applied.Load(), LastError: st.LastError.Load().(string)}
			rs.Syncs = st.Syncs.Load()
			if b := st.Batches.Load(); b > 0 {
				rs.ApplyAvgMs = float64(st.ApplyNs.Load()) / float64(b) / 1e6
			}
			if rs.Syncs > 0 {
				rs.SyncAvgMs = float64(st.SyncNs.Load()) / float64(rs.Syncs) / 1e6
			}
			if t := st.LastUpdate.Load(); t != 0 {
				rs.LastUpdate = time.Unix(0, t).Format(time.RFC3339Nano)
			}
			s.InSync = s.InSync && rs.Connected
			s.Replicas = append(s.Replicas, rs)
		}
	}
	return s
}

// Query asks the daemon behind socket for its status.
func Query(socket string) (Status, error) {
	var s Status
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return s, noDaemon(socket, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("status\n")); err != nil {
		return s, err
	}
	if err := json.NewDecoder(c).Decode(&s); err != nil {
		return s, fmt.Errorf("reading status from %s: %w", socket, err)
	}
	return s, nil
}

// loopback tells whether a listener's address is a loopback one.
func loopback(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}
