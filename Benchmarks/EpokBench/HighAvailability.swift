import Foundation
import NetnsLab

// A pair of routers with keepalived and conntrackd from deploy/ha (the active one crashed while 8 TCP
// connections and a UDP flow run through the front door), and two routers active at once behind ECMP (8 TCP
// connections moved between them), with and without what keeps the flows.
func highAvailabilityRows(epokd: String, deploy: String) throws -> [Row] {
    var rows: [Row] = []
    let kept = try RouterPairLab.failover(epokd: epokd, deploy: deploy, conntrackd: true, connections: 8)
    let lost = try RouterPairLab.failover(epokd: epokd, deploy: deploy, conntrackd: false, connections: 8)
    rows.append(Row(name: "failover: longest UDP gap through the front door (active router crashed; keepalived, conntrackd)", n: 2,
                    epokd: kept.udpGap * 1000, baselineName: "the same without conntrackd", baseline: lost.udpGap * 1000))
    rows.append(Row(name: "failover: established TCP connections kept, of 8 (higher is better)", n: 2, epokd: Double(kept.kept),
                    baselineName: "without conntrackd", baseline: Double(lost.kept), unit: "flows"))
    let hashed = try RouterPairLab.movedConnections(epokd: epokd, spread: "hash")
    let counted = try RouterPairLab.movedConnections(epokd: epokd, spread: "round-robin")
    rows.append(Row(name: "ECMP: TCP connections kept when moved to another router, of 8, --spread hash (higher is better)", n: 2,
                    epokd: Double(hashed.kept), baselineName: "--spread round-robin", baseline: Double(counted.kept), unit: "flows"))
    return rows
}
