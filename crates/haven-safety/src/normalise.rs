//! The text the rules see: one canonical spelling for the many ways people
//! type the same words.
//!
//! The rules are written against this form only, so each step here removes a
//! whole family of variants the rules would otherwise have to spell out:
//!
//! 1. apostrophes vanish (`I'm` → `im`, `don’t` → `dont`, `j'ai` → `jai`);
//! 2. lower case, NFKD, combining marks dropped (`Brücke` → `brucke`,
//!    `chcę` → `chce`), plus the few letters NFKD leaves alone (`ß` → `ss`,
//!    `ł` → `l`, `ø` → `o`, `æ` → `ae`, `œ` → `oe`);
//! 3. only ASCII letters, digits, single spaces, new lines and `. , ! ? ; :`
//!    survive; the few emoji that carry risk become words (💊 → `pills`),
//!    and hyphens, quotes, other emoji and other scripts become spaces;
//! 4. leetspeak inside words is undone (`k!ll mys3lf` → `kill myself`,
//!    `5uicide` → `suicide`) while numbers, times and doses stay (`3am`,
//!    `40 pills`, `20mg`);
//! 5. a run of four or more single letters is joined (`s u i c i d e`,
//!    `s.u.i.c.i.d.e` → `suicide`);
//! 6. a character repeated three or more times is kept once
//!    (`killlll` → `kil`, `sooo` → `so`, `...` → `.`), digits excepted.
//!
//! The result is plain ASCII, which also keeps the regex engine on its fast
//! path.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Returns the normalised form of `text` that the rules are matched against.
pub fn normalise(text: &str) -> String {
    let folded = fold(text);
    let unleeted = undo_leetspeak(&folded);
    let joined = join_spelled_out_words(&unleeted);
    squeeze(&joined)
}

/// Steps 1–3: apostrophes, case, accents, and the reduced alphabet.
fn fold(text: &str) -> String {
    if !text.is_ascii() {
        return fold_unicode(text);
    }
    // Most messages: NFKD changes no ASCII character, none is a combining
    // mark, and lower case is ASCII's. The same result, without the tables.
    let mut out = String::with_capacity(text.len());
    for c in text.chars().filter(|c| !is_apostrophe(*c)) {
        fold_char(c.to_ascii_lowercase(), &mut out);
    }
    out
}

fn fold_unicode(text: &str) -> String {
    let lowered: String = text.chars().filter(|c| !is_apostrophe(*c)).flat_map(char::to_lowercase).collect();
    let mut out = String::with_capacity(lowered.len());
    for c in lowered.nfkd().filter(|c| !is_combining_mark(*c)) {
        fold_char(c, &mut out);
    }
    out
}

/// Step 3 for one lower-case, decomposed character.
fn fold_char(c: char, out: &mut String) {
    match c {
        'a'..='z' | '0'..='9' | '.' | ',' | '!' | '?' | ';' | ':' | '\n' => out.push(c),
        // Kept for the leetspeak step, which decides what they mean.
        '@' | '$' | '|' | '*' => out.push(c),
        'ß' => out.push_str("ss"),
        'ł' => out.push('l'),
        'ø' => out.push('o'),
        'æ' => out.push_str("ae"),
        'œ' => out.push_str("oe"),
        'đ' | 'ð' => out.push('d'),
        'þ' => out.push_str("th"),
        'ı' => out.push('i'),
        '\r' | '\u{2028}' | '\u{2029}' => out.push('\n'),
        '…' => out.push('.'),
        // The emoji that carry risk become their word; others are spaces.
        '💊' => out.push_str(" pills "),
        '🔪' => out.push_str(" knife "),
        '🩸' => out.push_str(" blood "),
        '🪢' => out.push_str(" rope "),
        '🔫' => out.push_str(" gun "),
        '⚰' => out.push_str(" coffin "),
        '💉' => out.push_str(" needle "),
        '🌉' => out.push_str(" bridge "),
        '☠' => out.push_str(" death "),
        _ => out.push(' '),
    }
}

fn is_apostrophe(c: char) -> bool {
    matches!(c, '\'' | '’' | '‘' | '`' | '´' | 'ʼ' | 'ʹ' | '′')
}

/// Step 4. A digit or symbol is read as a letter when it sits between two
/// letters (`k1ll`, `k!ll`), or next to a letter in a word that has at least
/// three letters (`5uicide`, `h3ll0`) — which leaves `3am`, `2nd`, `20mg`,
/// `b4` and plain numbers alone. `@` and `$` need only one neighbouring
/// letter; `*` between letters is a censoring mark and is dropped (`k*ll`).
fn undo_leetspeak(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if !is_word_char(chars[i]) {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let end = chars[i..].iter().position(|c| !is_word_char(*c)).map_or(chars.len(), |n| i + n);
        let word = &chars[i..end];
        let word_letters = word.iter().filter(|c| c.is_ascii_lowercase()).count();
        for (at, &c) in word.iter().enumerate() {
            let Some(letter) = leet_letter(c) else {
                out.push(c);
                continue;
            };
            let left = at > 0 && word[at - 1].is_ascii_lowercase();
            let right = word.get(at + 1).is_some_and(char::is_ascii_lowercase);
            let read_as_letter = match c {
                '*' | '!' | '|' => left && right,
                '@' | '$' => left || right,
                _ => (left && right) || ((left || right) && word_letters >= 3),
            };
            match (read_as_letter, c) {
                (true, '*') => {}
                (true, _) => out.push(letter),
                (false, '@' | '$' | '|' | '*') => out.push(' '),
                (false, _) => out.push(c),
            }
        }
        i = end;
    }
    out
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '@' | '$' | '|' | '*' | '!')
}

fn leet_letter(c: char) -> Option<char> {
    Some(match c {
        '0' => 'o',
        '1' | '!' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' => 't',
        '|' => 'l',
        '*' => '*',
        _ => return None,
    })
}

/// Step 5. Joins `s u i c i d e` (single letters separated by one space or
/// one dot) into `suicide` when the run has at least four letters; shorter
/// runs are left alone because real sentences have them ("i a m" is rare,
/// "a b" is not).
fn join_spelled_out_words(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let is_single_letter = |at: usize| {
            bytes[at].is_ascii_lowercase()
                && (at == 0 || !bytes[at - 1].is_ascii_alphanumeric())
                && (at + 1 == bytes.len() || !bytes[at + 1].is_ascii_alphanumeric())
        };
        if is_single_letter(i) {
            // Extend the run: letter, separator, letter, separator, ...
            let mut end = i;
            let mut letters = 1;
            while end + 2 < bytes.len() && matches!(bytes[end + 1], b' ' | b'.') && is_single_letter(end + 2)
            {
                end += 2;
                letters += 1;
            }
            if letters >= 4 {
                out.extend((i..=end).step_by(2).map(|at| bytes[at] as char));
                i = end + 1;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Step 6, and white space: one space between words, no space at either end
/// of a line, and a character repeated three or more times kept once.
fn squeeze(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut run = 1;
        while i + run < chars.len() && chars[i + run] == c {
            run += 1;
        }
        i += run;
        match c {
            ' ' => {
                if !out.is_empty() && !out.ends_with(['\n', ' ']) {
                    out.push(' ');
                }
            }
            '\n' => {
                while out.ends_with(' ') {
                    out.pop();
                }
                if !out.is_empty() {
                    out.push('\n');
                }
            }
            '0'..='9' => out.extend(std::iter::repeat_n(c, run)),
            _ if run >= 3 => out.push(c),
            _ => out.extend(std::iter::repeat_n(c, run)),
        }
    }
    while out.ends_with([' ', '\n']) {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{fold, fold_unicode, normalise};

    #[test]
    fn ascii_text_folds_as_through_the_unicode_tables() {
        let every_ascii: String = (0..=127u8).map(char::from).collect();
        let mixed = "I'm OK`ish; K!LL @ 3AM\r\n\tTabs, \"quotes\" & <tags> ~ {x} [y] ^_^ #1 %20 +=-/\\";
        for text in [every_ascii.as_str(), mixed, "", "PLAIN words"] {
            assert_eq!(fold(text), fold_unicode(text), "{text:?}");
        }
        for c in every_ascii.chars() {
            assert_eq!(fold(&c.to_string()), fold_unicode(&c.to_string()), "{c:?}");
        }
    }

    #[test]
    fn emoji_that_carry_risk_become_words_and_others_spaces() {
        assert_eq!(normalise("💊💊 tonight"), "pills pills tonight");
        assert_eq!(normalise("got the 🪢 ready 😀"), "got the rope ready");
        assert!(
            crate::Detector::builtin().classify("took all my 💊 just now").level
                > haven_protocol::RiskLevel::None
        );
    }

    #[test]
    fn apostrophes_vanish_so_contractions_have_one_spelling() {
        assert_eq!(normalise("I'm sure I don’t"), "im sure i dont");
        assert_eq!(normalise("J'AI envie"), "jai envie");
        assert_eq!(normalise("im sure i dont"), "im sure i dont");
    }

    #[test]
    fn accents_and_special_letters_are_folded() {
        assert_eq!(normalise("Ich stehe auf der Brücke"), "ich stehe auf der brucke");
        assert_eq!(normalise("chcę umrzeć, połknęłam"), "chce umrzec, polknelam");
        assert_eq!(normalise("Straße, ﬁn, Ｋｉｌｌ"), "strasse, fin, kill");
        assert_eq!(normalise("não aguento mais"), "nao aguento mais");
    }

    #[test]
    fn leetspeak_inside_words_is_undone_but_numbers_stay() {
        assert_eq!(normalise("i want to k!ll mys3lf"), "i want to kill myself");
        assert_eq!(normalise("su1c1dal, 5uicide, $elf h@rm, k*ll"), "suicidal, suicide, self harm, kll");
        assert_eq!(
            normalise("I took 40 pills at 3am, 20mg each, b4 2nd dose!"),
            "i took 40 pills at 3am, 20mg each, b4 2nd dose!"
        );
        assert_eq!(normalise("t0night, g00dbye f0rever"), "tonight, goodbye forever");
    }

    #[test]
    fn spelled_out_words_are_joined() {
        assert_eq!(normalise("thinking about s u i c i d e"), "thinking about suicide");
        assert_eq!(normalise("s.u.i.c.i.d.e tonight"), "suicide tonight");
        assert_eq!(normalise("k-i-l-l myself"), "kill myself");
        assert_eq!(normalise("plan a or b"), "plan a or b");
    }

    #[test]
    fn long_repeats_and_white_space_are_squeezed() {
        assert_eq!(normalise("  soooo   tired!!!  "), "so tired!");
        assert_eq!(normalise("killlll myselfff..."), "kil myself.");
        assert_eq!(normalise("line one \r\n\n line two"), "line one\nline two");
        assert_eq!(normalise("1000 pills"), "1000 pills");
        assert_eq!(normalise("self-harm 🙁 again"), "self harm again");
    }
}
