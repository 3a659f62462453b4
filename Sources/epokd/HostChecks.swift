import ArgumentParser
import Control
import Dataplane
import Foundation
import Logging
import Prometheus

/// Warns about forwarding switches that are off, or turns them on (`--enable-forwarding`), in the namespace programmed.
func checkForwarding(_ switches: ForwardingSwitches, enable: Bool, logger: Logger) {
    let where_ = switches.namespacePath.map { " in \($0)" } ?? ""
    do {
        for sysctl in try switches.off() {
            if enable {
                do {
                    try switches.enable(sysctl)
                    logger.notice("set \(sysctl) = 1\(where_)")
                } catch {
                    logger.error("cannot set \(sysctl) = 1\(where_): \(error)")
                }
            } else {
                logger.warning("\(sysctl) is 0\(where_): forwarded connections will not leave this host (use --enable-forwarding or sysctl -w \(sysctl)=1)")
            }
        }
    } catch {
        logger.warning("cannot read the forwarding switches\(where_): \(error)")
    }
}
