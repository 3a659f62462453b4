import Control
import Foundation
import Testing

@Suite("Annotations and labels as a small ordered map")
struct StringMapTests {
    @Test("any sequence of sets and removals gives the map a dictionary would hold, in key order, equal whatever the order of the changes")
    func behavesAsADictionary() throws {
        var rng = SystemRandomNumberGenerator()
        let keys = ["a", "b", "epok.getbetter.ro/externalports", "epok.getbetter.ro/internal", "z", ""]
        for _ in 0..<2_000 {
            var map = StringMap(), dictionary: [String: String] = [:]
            for _ in 0..<Int.random(in: 0...12, using: &rng) {
                let key = keys.randomElement(using: &rng)!
                let value: String? = Bool.random(using: &rng) ? nil : ["1", "2", ""].randomElement(using: &rng)!
                map[key] = value
                dictionary[key] = value
            }
            #expect(map.keys == dictionary.keys.sorted())
            #expect(map.keys.allSatisfy { map[$0] == dictionary[$0] } && map.count == dictionary.count)
            #expect(map == StringMap(dictionary) && map.hashValue == StringMap(dictionary).hashValue)
            #expect(map["absent"] == nil)
            #expect(map.filter { $0.key.hasPrefix("epok") } == StringMap(dictionary.filter { $0.key.hasPrefix("epok") }))
            let json = try JSONEncoder().encode(map)
            #expect(try JSONSerialization.jsonObject(with: json) as? [String: String] == dictionary)
            #expect(try JSONDecoder().decode(StringMap.self, from: json) == map)
        }
    }

    @Test("a key written twice in a literal keeps its last value, as JSON's does")
    func lastValueWins() {
        let map: StringMap = ["k": "first", "j": "x", "k": "last"]
        #expect(map.keys == ["j", "k"] && map["k"] == "last")
    }
}
