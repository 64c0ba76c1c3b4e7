package cli

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/duet-ha/duet/pkg/node"
	"github.com/spf13/cobra"
)

func newRun(s IOStreams) *cobra.Command {
	var cfgPath, role, logLevel string
	var check bool
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the duet daemon",
		Example: `  duet run --config /etc/duet/duet.yaml
  duet run --config lab.yaml --role secondary`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cfgPath, false)
			if err != nil {
				return err
			}
			if role != "" {
				cfg.Role = role
				if err := cfg.Validate(); err != nil {
					return err
				}
			}
			if check {
				fmt.Fprintf(s.Out, "config %s: ok\n", cfgPath)
				return nil
			}
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(s.Err, &slog.HandlerOptions{Level: lvl})).With("node", cfg.Node)
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return node.Run(ctx, cfg, log)
		},
	}
	cmd.Flags().StringVarP(&cfgPath, "config", "c", "/etc/duet/duet.yaml", "configuration file")
	cmd.Flags().StringVar(&role, "role", "", "override the configured role (primary or secondary)")
	cmd.Flags().BoolVar(&check, "check", false, "check the configuration and exit")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}
