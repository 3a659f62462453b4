#!/bin/sh
# keepalived's notify for conntrackd, as conntrackd's primary-backup.sh does it:
#   conntrackd-notify.sh primary|backup|fault [CONFIG]
# primary: commit the flows the other router replicated into this kernel, then take over the sync;
# backup:  start conntrackd if it is not running, reset the kernel's timers of flows, ask the other for a resync;
# fault:   reset the kernel's timers of flows.
config=${2:-/etc/conntrackd/conntrackd.conf}
ct() { /usr/sbin/conntrackd -C "$config" "$@" || logger -t conntrackd-notify "conntrackd $* failed"; }
case "$1" in
  primary)
    ct -c   # commit the external cache to the kernel
    ct -f   # flush the internal and external caches
    ct -R   # resync the internal cache with the kernel
    ct -B   # send a bulk update to the other router
    ;;
  backup)
    if ! /usr/sbin/conntrackd -C "$config" -s >/dev/null 2>&1; then
      /usr/sbin/conntrackd -C "$config" -d || { logger -t conntrackd-notify "cannot start conntrackd"; exit 1; }
    fi
    ct -t   # shorten the kernel's timeouts of flows this router no longer forwards
    ct -n   # ask the other router for a resync
    ;;
  fault)
    ct -t
    ;;
  *)
    echo "usage: conntrackd-notify.sh primary|backup|fault [CONFIG]" >&2
    exit 1
    ;;
esac
exit 0
