package cli

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/duet-ha/duet/pkg/nfsd"
	"github.com/spf13/cobra"
)

func newNFSServe(s IOStreams) *cobra.Command {
	var listen string
	var allow []string
	var noRootSquash, insecure bool
	var anonUID, anonGID uint32
	c := &cobra.Command{
		Use:   "nfs-serve DIR",
		Short: "Serve a replicated directory over NFSv3 with handles that survive failover",
		Long: `Serve DIR over NFSv3 (NFS and MOUNT on one TCP port, no portmapper, no NLM)
with file handles kept in DIR/.duet-nfs, so that a server started on the
peer's copy after a failover resolves every handle this one gave out.
Durability calls are plain fsyncs: run it under "duet exec" so that they
wait for the peer. --allow limits the clients to the networks given (the
loopback is always allowed, for health checks); without it every client
that reaches the address is served.

NFS calls must carry AUTH_SYS credentials (sec=sys, Linux's default) and
act as the user they name: the kernel checks each file operation against
that user, and new files belong to it. A client's root is the anonymous
user (--anon-uid, --anon-gid; 65534) unless --no-root-squash is given.
AUTH_SYS is the client's word: whoever controls a client host can claim
any uid but root, so --allow only hosts you trust. Calls but NULL must come
from a privileged source port (below 1024: only root binds one; a Linux
mount's default, as knfsd's "secure" export option asks) unless --insecure
is given: from any other, any user of the client host could claim any uid.`,
		Example: `  duet exec -- duet nfs-serve /var/lib/duet-k3s/nfs --listen 0.0.0.0:2049 --allow 192.168.10.0/24
  duet nfs-serve /srv/export --listen 127.0.0.1:2049 --no-root-squash
  mount -t nfs -o vers=3,proto=tcp,port=2049,mountport=2049,mountproto=tcp,nolock VIP:/ /mnt`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			nets, err := nfsd.ParseAllow(allow)
			if err != nil {
				return fmt.Errorf("--allow: %w", err)
			}
			l, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("--listen %q: %w", listen, err)
			}
			log := slog.New(slog.NewTextHandler(s.Err, nil))
			if len(nets) == 0 {
				log.Warn("serving every NFS client that reaches the address (--allow limits them)", "listen", l.Addr())
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			fmt.Fprintf(s.Out, "serving %s over NFSv3 on %s\n", args[0], l.Addr())
			sq := nfsd.Squash{Root: !noRootSquash, AnonUID: anonUID, AnonGID: anonGID, Insecure: insecure}
			if noRootSquash {
				log.Warn("clients' root acts as root on the export (--no-root-squash)")
			}
			if insecure {
				log.Warn("calls from unprivileged source ports are served: any user of an allowed client host can act as any uid (--insecure)")
			}
			return nfsd.Serve(ctx, &nfsd.AllowListener{Listener: l, Allow: nets, Log: log}, args[0], nfsd.Fsync{}, sq)
		},
	}
	c.Flags().StringVar(&listen, "listen", ":2049", "TCP address for NFS and MOUNT")
	c.Flags().StringSliceVar(&allow, "allow", nil, "client networks served (CIDR or address, repeatable); default every client")
	c.Flags().BoolVar(&noRootSquash, "no-root-squash", false, "let a client's root (uid 0) act as root on the export")
	c.Flags().BoolVar(&insecure, "insecure", false, "serve calls from unprivileged source ports (1024 and above) too, as knfsd's insecure option")
	c.Flags().Uint32Var(&anonUID, "anon-uid", 65534, "uid a client's root acts as (root squash)")
	c.Flags().Uint32Var(&anonGID, "anon-gid", 65534, "gid a client's root group acts as (root squash)")
	return c
}
