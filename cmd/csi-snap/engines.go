package main

import (
	"path/filepath"

	"github.com/csi-snap/csi-snap/driver"
	"github.com/csi-snap/csi-snap/driver/kernel"
)

// openRealEngines opens the cow store at <data-dir>/store and the kernel
// frontend in the run dir; the frontend's fd holder is this binary's
// fuse-holder subcommand.
func openRealEngines(cfg Config) (*engines, error) {
	st, err := driver.OpenCowStore(filepath.Join(cfg.DataDir, "store"))
	if err != nil {
		return nil, err
	}
	st.SetSurviveKill(cfg.SurviveKill)
	fe, err := driver.NewKernelFrontend(kernel.Config{RunDir: cfg.RunDir, ExternalHolder: cfg.ExternalHolder})
	if err != nil {
		st.Close()
		return nil, err
	}
	return &engines{store: st, frontend: fe, freeze: kernel.Freeze, thaw: kernel.Thaw}, nil
}

func probeHolder(socket string) error { return kernel.ProbeHolder(socket) }

func runHolder(socket string, stay bool) error {
	if stay {
		return kernel.RunHolderStay(socket)
	}
	return kernel.RunHolder(socket)
}
