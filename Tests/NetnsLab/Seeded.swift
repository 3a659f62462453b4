import Foundation

/// A reproducible random number generator (SplitMix64) for property and fuzz tests.
///
/// The seed comes from `EPOKD_TEST_SEED` when set, otherwise from the system; tests print it in every failure
/// message (`description`), so any failing run can be replayed with `EPOKD_TEST_SEED=<seed>`.
public struct SeededGenerator: RandomNumberGenerator, CustomStringConvertible {
    public let seed: UInt64
    private var state: UInt64

    public init(seed: UInt64? = nil) {
        let chosen = seed ?? ProcessInfo.processInfo.environment["EPOKD_TEST_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 0...UInt64.max)
        self.seed = chosen
        state = chosen
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public var description: String { "seed \(seed) (replay with EPOKD_TEST_SEED=\(seed))" }
}
